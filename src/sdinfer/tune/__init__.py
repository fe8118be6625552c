"""``sdinfer tune``: the fastest configuration of a model that keeps a quality budget.

- ``budget``: the quality floor (``adherence-drop=0.02``, ``psnr=35``, ``ssim=0.9``, several
  comma-separated) against the 50-step DDIM reference on validation prompts, and ``Quality``;
- ``space``: the search space as data (axes: sampler, time grid, analytic first step, cache and
  knob, per-prompt steps; then the step counts), filtered to what the model supports;
- ``search``: the fewest steps meeting the budget per setting of the other axes (binary search),
  screened by successive halving over the validation prompts and a MAC cost model, the finalists
  timed against the reference (``evaluate.ModelEvaluator``);
- ``front``: the Pareto front of speed-up against quality of everything evaluated (JSON, plot);
- ``preset``: the chosen configuration as JSON, ``load_preset`` to run it.
"""
