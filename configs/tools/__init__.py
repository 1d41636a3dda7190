"""Tools that wrote the committed files of ``configs/`` (data, tokenizers, model configs);
rerunning each one writes byte-identical files."""
