"""Training data for the Moshi LM.

- `speech_synth`: offline eSpeak NG speech with word timings; the built-in synthetic dialogue set.
- `interleaver`: word alignments -> the frame-aligned Inner Monologue text stream (moshi-finetune rules).
- `tokenize`: the `moshi-jax data tokenize` job (manifest + audio + alignments -> Mimi codes + text in
  ArrayRecord shards), text-only sources, and `prepare_builtin_dataset`.
- `records`: the on-disk format of tokenized datasets (shards + index.json).
- `pipeline`: the Grain input pipeline, `make_dataset(data_cfg, lm_cfg, train)`.

Submodules are imported on use (the package import stays light).
"""
