"""Weights & Biases logging of a training run (``logger.wandb``), as BasicSR users know it.

    logger:
      use_tb_logger: true          # W&B receives what TensorBoard receives
      wandb:
        project: vqir              # a W&B run starts when this is set
        entity: ~                  # optional: a team or user
        resume_id: ~               # optional: continue this run instead of the training state's

Process 0 alone starts the run (named like the experiment, the options as its config, its files
under the experiment folder). Every scalar written to TensorBoard (losses, learning rate,
validation metrics) is logged to W&B at the same iteration. The run's id is kept in the training
state, so ``--auto_resume`` continues the same W&B run; ``resume_id`` overrides it. BasicSR asks
for the id by hand. The ``wandb`` package is optional (``pip install wandb``); ``WANDB_MODE=offline``
works as usual.
"""
__all__ = ['init_wandb_run', 'ScalarLoggers']


def init_wandb_run(opt, resume_state):
    """The W&B run of this training (None when not asked, on other processes, or in debug runs)."""
    wandb_opt = opt['logger'].get('wandb') or {}
    if not wandb_opt.get('project') or opt['rank'] != 0 or 'debug' in opt['name']:
        return None
    import wandb  # present: the options check asked for it
    run_id = wandb_opt.get('resume_id') or (resume_state or {}).get('wandb_id')
    return wandb.init(id=run_id, resume='allow' if run_id else 'never',  # a new run: W&B picks its id
                      project=wandb_opt['project'], entity=wandb_opt.get('entity'), name=opt['name'],
                      config=dict(opt), dir=opt['path']['experiments_root'])


class ScalarLoggers:
    """TensorBoard's ``add_scalar`` / ``close``, forwarded to the TensorBoard writer and the W&B run."""

    def __init__(self, tb_logger, wandb_run):
        self.tb_logger, self.wandb_run = tb_logger, wandb_run

    def add_scalar(self, tag, value, step):
        self.tb_logger.add_scalar(tag, value, step)
        self.wandb_run.log({tag: value}, step=step)

    def close(self):
        self.tb_logger.close()
        self.wandb_run.finish()
