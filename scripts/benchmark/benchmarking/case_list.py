"""The benchmark's cases: which ones a command line asks for, and their ids."""
import fnmatch

from vqir.inference import DEFAULT_AUTO_TILE_PIXELS

from benchmarking.sizes import size_name


MAIN_OPS = ('down', 'up', 'roundtrip', 'train1', 'train2', 'precision')
REFERENCE_OPS = ('ref_forward', 'ref_train', 'ref_memory')
TRAINING_OPS = ('train1', 'train2', 'ref_train')
MEMORY_VARIANTS = ('ours', 'ours_plain', 'ref', 'ref_tiled')
OP_ALIASES = {'train': ('train1', 'train2')}


def case_id(spec):
    """'cpu/x16/down/512x512', 'cpu/x16/train2/b4@256', 'cpu/x16/ref_train/s1/b1@256', 'cpu/x16/ref_memory/ref/2040x1356'."""
    op = spec['op']
    if op == 'conv':
        return f"{spec['device']}/conv"
    parts = [spec['device'], f"x{spec['scale']}", op]
    if op == 'ref_train':
        parts.append(f"s{spec['stage']}")
    if op == 'ref_memory':
        parts.append(spec['variant'])
    parts.append(f"b{spec['batch']}@{spec['crop']}" if op in ('train1', 'train2', 'ref_train') else size_name(spec['size']))
    return '/'.join(parts)


def build_cases(args, devices):
    common = dict(threads=args.threads, dtype=args.dtype, channels_last=args.channels_last, compile=args.compile,
                  tile=args.tile, tile_overlap=args.tile_overlap, smoke=args.smoke, seed=args.seed,
                  reference=args.reference, profile=args.profile, memory_limit=args.memory_limit_bytes,
                  auto_tile_pixels=args.auto_tile_pixels, malloc=args.malloc)
    cases = []
    for device in devices:
        base = dict(common, device=device, repeats=args.repeats, warmup=args.warmup)
        cases.append(dict(base, op='conv', scale=None))
        for scale in args.scales:
            for op in ('down', 'up', 'roundtrip'):
                if op in args.ops:
                    for size in args.sizes:
                        cases.append(dict(base, op=op, scale=scale, size=size, batch=1))
            if 'precision' in args.ops:
                half = args.dtype if args.dtype != 'fp32' else ('fp16' if device == 'cuda' else 'bf16')
                for size in args.sizes:
                    if size[0] * size[1] <= DEFAULT_AUTO_TILE_PIXELS:
                        cases.append(dict(base, op='precision', scale=scale, size=size, batch=1, half_dtype=half,
                                          weights=args.weights))
            for op, stage in (('train1', 1), ('train2', 2)):
                if op in args.ops:
                    for batch in args.train_batches:
                        cases.append(dict(base, op=op, scale=scale, stage=stage, batch=batch, crop=args.train_crop))
            if not args.reference:
                continue
            if 'ref_forward' in args.ops:
                for size in args.sizes:
                    if size[0] * size[1] > DEFAULT_AUTO_TILE_PIXELS:
                        continue  # beyond the reference's whole-image limit: see ref_memory
                    cases.append(dict(base, op='ref_forward', scale=scale, size=size))
            if 'ref_train' in args.ops:
                for stage in (1, 2):
                    for batch in args.reference_train_batches:
                        cases.append(dict(base, op='ref_train', scale=scale, stage=stage, batch=batch,
                                          crop=args.train_crop))
            if 'ref_memory' in args.ops and args.memory_size is not None:
                for variant in args.memory_variants:
                    cases.append(dict(base, op='ref_memory', scale=scale, size=args.memory_size, variant=variant,
                                      repeats=args.memory_repeats, warmup=0))
    for spec in cases:
        spec['id'] = case_id(spec)
        if spec['dtype'] == 'fp16' and spec['device'] == 'cpu':
            spec['skip_reason'] = 'fp16 runs on CUDA only (use --dtype bf16 on CPU)'
    return [c for c in cases if not any(fnmatch.fnmatch(c['id'], pattern) for pattern in args.skip)]
