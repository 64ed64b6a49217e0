"""Atomic file writes: a reader (or a resumed run) sees the old file or the complete new one, never a
partial file. The data goes to a temporary name in the target's folder, is flushed and fsynced,
gets the usual permissions, and is renamed over the target; on any error the temporary file is
removed and the target is left as it was."""
import os
import tempfile

__all__ = ['atomic_write', 'atomic_write_bytes']


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call ``write(tmp_path)`` (it creates the file's content), then rename it over ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    os.close(fd)
    try:
        write(tmp_path)
        with open(tmp_path, 'rb+') as f:
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""

    def write(tmp_path):
        with open(tmp_path, 'wb') as f:
            f.write(data)

    atomic_write(path, write)
