"""Sub-commands of ``iwae`` beyond train/eval/sample, one module each (see ``iwae.cli``)."""
