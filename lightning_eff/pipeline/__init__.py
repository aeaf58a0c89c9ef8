"""``lightning-eff pipeline``: run named ``fit`` / ``validate`` / ``test`` / ``rank`` stages in order from one YAML.

Usage::

    lightning-eff pipeline --config configs/pipeline/digits_ncfm_sdc_drupi_rank_ko.yaml
    lightning-eff pipeline --config ... --stages rank,student          # a subset (earlier outputs must exist)
    lightning-eff pipeline --config ... --set distill.trainer.max_steps=20 --set student.trainer.max_epochs=5
    lightning-eff pipeline --config ... --output_dir runs/try2 --dry_run # print the stage commands only

Every stage is an ordinary ``lightning-eff`` command (the LightningCLI's ``fit`` / ``validate`` / ``test``, or
``rank``, the DD-Ranking evaluator) built from existing config files plus overrides, so a pipeline is a list
of commands you could type, wired together by the paths of what each one writes. The file::

    name: my_pipeline                       # default: the file name
    output_dir: outputs/pipeline/my_pipeline  # relative to the working directory; --output_dir overrides
    isolation: inprocess                    # or subprocess (each stage in a fresh `python`); --isolation
    stages:                                 # run in this order
      distill:                              # a stage name: letters, digits, _ and -
        command: fit                        # fit | validate | test | rank
        config: ../distill/ncfm_digits_ipc10.yaml   # one path or a list, relative to THIS file
        overrides:                          # a mapping given to the command as one more --config (last)
          model: {init_args: {save_dir: ${stage.output_dir}}}
        args: [--trainer.max_steps=300]     # extra command-line arguments (after everything else)
        outputs: {synthetic_set: synthetic_set.pt}  # files the stage writes, relative to its folder
      student:
        command: fit
        config: ../ko/digits.yaml
        overrides:
          data: {class_path: SyntheticSetDataModule, init_args: {path: ${stages.distill.synthetic_set}, ...}}

References, replaced by the pipeline in ``config``, ``overrides`` and ``args`` before the stage runs:

* ``${stage.output_dir}``: this stage's folder, ``<output_dir>/<stage name>``;
* ``${stages.NAME.output_dir}``: an earlier stage's folder (``${stages.NAME.output_dir}/file.pt`` for a file
  in it);
* ``${stages.NAME.OUTPUT}``: the path of an output declared in that stage's ``outputs``;
* ``${pipeline.output_dir}``, ``${pipeline.name}``.

A value that is a reference to an earlier stage (optionally followed by ``/path``) names an artefact: it
must exist when the stage starts, else the pipeline stops with an error that names the stage to run first.
Any other ``${...}`` is left to the command itself (OmegaConf interpolation, resolved within each config
file). The pipeline sets ``trainer.default_root_dir`` (and ``rank``'s ``--output_dir``) to the stage's
folder; a module that writes elsewhere (a distillation's ``save_dir``) is pointed there with
``${stage.output_dir}``. After a stage, each declared output must exist.

Results: ``<output_dir>/pipeline_summary.json`` (written atomically after every stage) with, per stage, the
equivalent shell command, the status (``ok`` / ``failed`` / ``skipped`` / ``not_run``), the folder, the
seconds, the outputs, the scalar metrics (``test/acc``, ``val/acc``, ``distill/loss``, DD-Ranking's
``ranking/<set>/lrs`` ... read from ``ranking.json``) and the key ones among them. Each stage folder holds
``pipeline_overrides.yaml``, the ``--config`` the overrides became. Exit status 0 when every selected stage
succeeded, 1 otherwise (with the error).

Stages run in this process by default (no interpreter start-up per stage; global state that a stage
changes, such as the deterministic-algorithms flag, the thread count and the seed environment, is restored
afterwards), or each in a fresh process of the same Python with ``isolation: subprocess``
(``python -m lightning_eff.pipeline _stage ...``). A stage whose strategy launches more processes
(``strategy: ddp`` with ``devices > 1``: Lightning re-runs the command line once per rank) needs
``isolation: subprocess``.

Layout: :mod:`~lightning_eff.pipeline.stages` (names, :class:`PipelineError`, :class:`Stage`),
:mod:`~lightning_eff.pipeline.spec` (:class:`Pipeline`: parse, resolve, run), :mod:`~lightning_eff.pipeline.runner`
(one stage), :mod:`~lightning_eff.pipeline.summary` (``pipeline_summary.json`` and its table) and
:mod:`~lightning_eff.pipeline.cli` (:func:`main`).
"""

from lightning_eff.pipeline import stages
from lightning_eff.pipeline.cli import build_parser, main
from lightning_eff.pipeline.runner import run_stage_inprocess
from lightning_eff.pipeline.spec import Pipeline
from lightning_eff.pipeline.stages import *  # noqa: F403  (the names and stage types of stages.__all__)
from lightning_eff.pipeline.summary import format_summary

__all__ = ["Pipeline", "build_parser", "format_summary", "main", "run_stage_inprocess"]
__all__ += stages.__all__
