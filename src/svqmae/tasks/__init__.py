"""The tasks room: what a user runs. Pre-training (``pretrain``), SUPERB-style evaluation
(``evaluate/``), CTC fine-tuning (``finetune``), transcription and scoring (``transcribe``, ``decode``,
``recognizer``), feature extraction (``extract``), ONNX export (``export``), the s3prl upstream
(``s3prl``), the data commands (``datacmd``) and the demo (``demo``). Each module that is a command
registers it with ``add_cli``. Tasks import ``engine``, ``model``, ``data`` and ``config``."""
