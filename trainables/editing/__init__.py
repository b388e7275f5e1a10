"""Knowledge editing, ROME and MEMIT through easyeditor: the trial loop and configs (``loop``),
the edit requests built from the migrations (``requests``) and what makes easyeditor 0.0.1 run
beside transformers 5 on any device (``compat``). ``python -m trainables.editing`` converts a
trial config to EasyEdit hparams and back."""
