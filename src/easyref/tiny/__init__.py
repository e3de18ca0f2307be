"""The tiny profile's pretrained parts, each trained offline by a project command and shipped in ``easyref/assets``.

Wherever the real system starts from a pretrained model, the tiny profile starts from a tiny model of the same
architecture that this package pretrained on demo-style data drawn with other seeds than the demo's:

==============  ==========================================  ===============================================
part            module (``easyref pretrain-tiny PART``)     what it must be able to do (its ``check``)
==============  ==========================================  ===============================================
``sdxl``        :mod:`easyref.tiny.base`                    reconstruct the demo's colours, draw from text
``clip``        :mod:`easyref.tiny.judges`                  same-subject images closer; captions match
``dino``        :mod:`easyref.tiny.judges`                  same-subject images closer, without labels
``mllm``        :mod:`easyref.tiny.mllm`                    caption an image's colour, shape and pattern
``ip_adapter``  :mod:`easyref.tiny.ip_adapter`              an IP-Adapter-SDXL trained on the tiny base
==============  ==========================================  ===============================================

Each asset folder holds the model files and ``pretrain.json``: the settings, the data, the code fingerprint, the
seconds it took and the sha256 of every file. :mod:`easyref.tiny.assets` reads and writes them;
:mod:`easyref.tiny_models` installs them over the random models it writes.
"""
