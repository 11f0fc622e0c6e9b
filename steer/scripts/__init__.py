"""Recipe runners behind ``steer train ...``: script arguments, data loading, load → train → save.

``steer.scripts.constrained`` (``steer train constrained``) and ``steer.scripts.persona`` (``steer train
persona``); the trainers themselves live in :mod:`steer.trainers`, their math in :mod:`steer.guidance` and
:mod:`steer.persona`.
"""
