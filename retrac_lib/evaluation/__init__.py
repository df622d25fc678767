"""How right the scores are, and what the book reports about them (chapters 4-6 and 9).

* ``metrics``: generality, timestep bias and specificity of top-k proponents, and their tables;
* ``baselines``: the methods attribution is compared with (D-TRAK, gradient cosine, pixel and
  feature neighbours, random), served by ``attribute_any``;
* ``features``: the feature space of a small seeded CNN digit classifier (the feature neighbour);
* ``counterfactual``: retraining truth: removing proponents, the linear datamodeling score (LDS);
* ``study``: the scale ladder, whose results live in ``retrac_lib/results/``.

It builds on the core (``retrac_lib``) and never on ``retrac_lib.book``; the core never imports
it, except the command line's ``study`` command, which loads ``study`` when it runs. Import the
modules explicitly: ``from retrac_lib.evaluation import metrics``.
"""
