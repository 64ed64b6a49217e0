"""Image sizes as the benchmark scripts write them: ``N`` or ``WIDTHxHEIGHT`` on the command line,
``WIDTHxHEIGHT`` in case ids and reports; ``(height, width)`` inside, as torch orders them."""
import argparse
import re


def parse_size(text):
    """'256' -> (256, 256); '2040x1356' (width x height; or 2040X1356) -> (1356, 2040) as (H, W)."""
    match = re.fullmatch(r'\s*(\d+)(?:\s*x\s*(\d+))?\s*', text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f'size {text!r}: expected N or WIDTHxHEIGHT, e.g. 512 or 2040x1356')
    width = int(match.group(1))
    height = int(match.group(2)) if match.group(2) else width
    return height, width


def size_name(hw):
    """(H, W) -> 'WxH'."""
    return f'{hw[1]}x{hw[0]}'
