"""Evaluation of trained models: transcript metrics (WER), spectral distances, engine-driven ASR/TTS runs."""
