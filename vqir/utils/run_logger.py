"""One log file per run, also when several runs share a process (tests, notebooks, resume).

basicsr's ``get_root_logger(log_file=...)`` sets the 'basicsr' logger up only on its first call
in a process: a later run writes no file of its own (or into the previous run's), and a run that
starts in the same second as another overwrites its file. This replaces the file handler for
each run and appends instead of truncating. Everything else still logs through
``basicsr.utils.get_root_logger()``.
"""
import logging

from basicsr.utils import get_root_logger

from .dist import get_dist_info

_FORMAT = '%(asctime)s %(levelname)s: %(message)s'


def init_run_logger(log_file, log_level=logging.INFO):
    logger = get_root_logger(logger_name='basicsr', log_level=log_level)
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            handler.close()
    rank, _ = get_dist_info()
    if rank != 0:
        logger.setLevel(logging.ERROR)  # other ranks stay quiet, as in basicsr
        return logger
    logger.setLevel(log_level)
    file_handler = logging.FileHandler(log_file, 'a', encoding='utf-8')
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    file_handler.setLevel(log_level)
    logger.addHandler(file_handler)
    return logger
