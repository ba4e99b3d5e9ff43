"""`python -m train.train_lm [config] [key=value ...]`: the LM training job (same as `moshi-jax train`).

The implementation lives in `moshi_jax.training.train_lm` (so the installed `moshi-jax` command has it too);
this module re-exports it for scripts and tests.
"""

import sys

from moshi_jax.training.train_lm import (  # noqa: F401 - re-exports
    Program,
    lm_program,
    main,
    synthetic_codes,
    to_global,
    train_loop,
    write_report,
)

if __name__ == "__main__":
    main()
    sys.exit(0)
