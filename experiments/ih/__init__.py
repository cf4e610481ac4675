"""The induction-head toy (transformers.md): the 2-layer attention-only target (`model`), its task
(`data`) and its training with the circuit check (`train_target`). Not yet a runnable family: the
decomposition config, `build` and the analysis are issue 25's open part."""
