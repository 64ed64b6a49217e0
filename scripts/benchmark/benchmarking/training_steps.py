"""One training iteration of stage 1 (the IFRM learns) or stage 2 (the MSRM and a discriminator
learn), with the reference's losses and optimiser, on any network with the reference's forward
signature: ours or the reference's."""
import torch
import torch.nn.functional as F

from benchmarking.images import random_images
from benchmarking.networks import precision_context


# Training set-up of the paper / reference configs.
ADAM = dict(lr=1e-4, betas=(0.9, 0.96))


def freeze_all_but(net, part):
    for name, child in net.named_children():
        child.requires_grad_(name == part)
    # fixed filters stay fixed (the IFRM's Haar weights are parameters with requires_grad False)
    if part == 'icrm':
        for pname, param in net.icrm.named_parameters():
            if pname.endswith('haar_weights'):
                param.requires_grad_(False)
    return [p for p in getattr(net, part).parameters() if p.requires_grad]


def optimizer_step(loss, optimizer, scaler):
    """Backward and one optimiser step, through the fp16 gradient scaler when there is one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def build_losses(spec, device):
    """The training losses (reference weights), built once so that both networks of a comparison
    use the very same modules (LPIPS with a random backbone included)."""
    from basicsr.losses.basic_loss import L1Loss
    from basicsr.losses.gan_loss import GANLoss

    from vqir.losses.edge_loss import LaplacianEdgeLoss
    from vqir.losses.ifrm_loss import FeatureRecoveryLoss, GramLoss, LRGuidanceLoss
    from vqir.losses.lpips_loss import LPIPSLoss
    if spec['stage'] == 1:
        return {'guide': LRGuidanceLoss(0.5), 'feature': FeatureRecoveryLoss(1.0), 'gram': GramLoss(1.0)}
    torch.manual_seed(spec['seed'] + 5)
    return {'pixel': L1Loss(loss_weight=1.0), 'edge': LaplacianEdgeLoss(loss_weight=0.05).to(device),
            'lpips': LPIPSLoss(loss_weight=1.0, net='alex' if spec['smoke'] else 'vgg',
                               pretrained_backbone=False).to(device),
            'gan': GANLoss('hinge', loss_weight=0.1)}


class Stage1Step:
    """One stage-1 iteration on any VQIR-like network with the reference's forward signature."""

    def __init__(self, net, losses, device, dtype):
        self.net, self.device, self.dtype = net, device, dtype
        self.params = freeze_all_but(net, 'icrm')
        net.train()
        self.optimizer = torch.optim.Adam(self.params, **ADAM)
        self.guide, self.feature, self.gram = losses['guide'], losses['feature'], losses['gram']
        self.scaler = torch.amp.GradScaler(device.type) if dtype == 'fp16' else None

    def __call__(self, batch):
        with precision_context(self.device, self.dtype):
            out = self.net(batch['hr'], is_train=True)
            loss = (self.guide(out['LR'].float(), batch['lr']) +
                    self.feature(out['re_quant_feat'].float(), out['quant_feat'].float()) +
                    self.gram(out['re_quant_feat'].float(), out['quant_feat'].float()))
        optimizer_step(loss, self.optimizer, self.scaler)
        return float(loss.detach())


class Stage2Step:
    """One stage-2 iteration (MSRM step, then discriminator step) on any VQIR-like network."""

    def __init__(self, net, discriminator, losses, device, dtype):
        self.net, self.net_d, self.device, self.dtype = net, discriminator, device, dtype
        self.params = freeze_all_but(net, 'refine')
        net.train()
        self.params_d = list(discriminator.parameters())
        self.optimizer = torch.optim.Adam(self.params, **ADAM)
        self.optimizer_d = torch.optim.Adam(self.params_d, **ADAM)
        self.pixel, self.edge, self.lpips, self.gan = losses['pixel'], losses['edge'], losses['lpips'], losses['gan']
        self.scaler = torch.amp.GradScaler(device.type) if dtype == 'fp16' else None
        self.scaler_d = torch.amp.GradScaler(device.type) if dtype == 'fp16' else None

    def __call__(self, batch):
        targets = batch['levels']
        self.net_d.requires_grad_(False)
        with precision_context(self.device, self.dtype):
            out = self.net(targets['Level_1'], is_train=True)
            levels = {k: out[k].float() for k in targets}
            loss = sum(self.pixel(levels[k], t) + self.edge(levels[k], t) for k, t in targets.items())
            loss = loss + self.lpips(levels['Level_1'], targets['Level_1'])
            loss = loss + self.gan(self.net_d(levels['Level_1']), True, is_disc=False)
        optimizer_step(loss, self.optimizer, self.scaler)
        self.net_d.requires_grad_(True)
        with precision_context(self.device, self.dtype):
            loss_d = (self.gan(self.net_d(targets['Level_1']), True, is_disc=True) +
                      self.gan(self.net_d(levels['Level_1'].detach()), False, is_disc=True))
        optimizer_step(loss_d, self.optimizer_d, self.scaler_d)
        return float(loss.detach()), float(loss_d.detach())


def build_discriminator(spec, device):
    from basicsr.archs.discriminator_arch import UNetDiscriminatorSN
    torch.manual_seed(spec['seed'] + 7)
    return UNetDiscriminatorSN(num_in_ch=3, num_feat=32 if spec['smoke'] else 64, skip_connection=True).to(device)


def training_batch(spec, device):
    """A training batch: HR crops in [-1, 1] and their bicubic (antialiased) LR / level targets."""
    crop, batch, scale = spec['crop'], spec['batch'], spec['scale']
    hr = random_images(batch, crop, crop, torch.device('cpu'), spec['seed'] + 3) * 2 - 1

    def down(factor):
        return F.interpolate(hr, scale_factor=1 / factor, mode='bicubic', antialias=True, align_corners=False)

    data = {'hr': hr, 'lr': down(scale), 'levels': {'Level_1': hr, 'Level_2': down(2), 'Level_4': down(4)}}
    return {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in data.items()}


def make_step(net, spec, device, losses, discriminator=None, dtype=None):
    dtype = dtype or spec['dtype']
    if spec['stage'] == 1:
        return Stage1Step(net, losses, device, dtype)
    return Stage2Step(net, discriminator, losses, device, dtype)
