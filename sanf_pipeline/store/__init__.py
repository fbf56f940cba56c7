"""Files sanf writes: atomic writes and safe reading of JSON/safetensors (``atomic``), and run folders (file names,
config lifecycle, resume and overwrite rules: ``run_folder``)."""
