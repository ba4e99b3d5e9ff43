"""The Moshi LM (multi-stream RQ-Transformer): `config.LMConfig`, `model.LMModel` / `model.forward`,
`checkpoint.load_reference` / `save_reference` / `load_pretrained`, `delays`, and generation in `generate`.

    from moshi_jax.lm.checkpoint import load_pretrained
    from moshi_jax.lm.model import forward
    cfg, params = load_pretrained("path/to/moshiko-pytorch-bf16")   # config.json + model.safetensors
    out = forward(params, codes, cfg)      # codes int32 [B, 17, T] -> LMOutput (logits + masks, undelayed)
"""
