"""KFP v2 components of the EasyRef pipeline, one folder per step (see each folder's README.md).

Every component is a thin lightweight-Python wrapper around the ``easyref`` command line. It runs in the project
image (``infra/Dockerfile``), named by :data:`components.settings.BASE_IMAGE`, which has ``kfp`` and this folder
installed, so no component installs packages at run time. Locally the same functions run through
``kfp.local.SubprocessRunner(use_venv=False)`` in the project's virtual environment.
"""
