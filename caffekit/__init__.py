"""Caffe's formats and network definitions without Caffe.

Shared by every host-side stage: the dataset builder writes Datum LMDBs and mean
files, the trainer and the IR compiler read prototxt and caffemodel files, and all
of them build networks from one normalized layer graph (``caffekit.graph``).
"""
