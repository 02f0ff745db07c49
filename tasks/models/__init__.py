"""Model families: what `model.name` can be (catalog.py: no Keras), how each is built
(build.py; the CNNs in cnn.py, transfer learning in transfer.py, the LSTM in lstm.py), how
a model file is read (files.py) and how a classifier is wrapped to serve raw pixels
(wrap.py)."""
