"""Classifier training, driver to batch: `run.py` is `raypurify train` (inputs, defence,
reuse of OUT), `classifier.py` runs one training on Ray Train, `loop.py` is the loop each
Ray Train worker runs, `epoch.py` the plain-PyTorch epoch, prediction and accuracy;
`config.py` holds the recipes, `data.py` how batches reach the workers."""
