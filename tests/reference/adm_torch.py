"""A PyTorch transcription of the guided-diffusion UNet, for parity tests only.

Written from the architecture description (Dhariwal & Nichol 2021 / I2SB's
``UNetModel``), not copied: NCHW, state-dict names of the original
(``input_blocks.<i>.<j>``, ``in_layers.{0,2}``, ``emb_layers.1``,
``out_layers.{0,3}``, ``skip_connection``, ``op``, ``qkv``/``proj_out`` as
conv1d, ``time_embed.{0,2}``, ``out.{0,2}``). Nothing is zero-initialised, so
random weights exercise every path.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F


def gn(channels):
    return nn.GroupNorm(32, channels, eps=1e-5)


def sinusoid(t, dim, max_period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    out = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(out, (0, 1)) if dim % 2 else out


class Res(nn.Module):
    def __init__(self, cin, emb, cout, scale_shift, mode=None):
        super().__init__()
        self.mode, self.scale_shift = mode, scale_shift
        self.in_layers = nn.Sequential(gn(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(gn(cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def resample(self, x):
        if self.mode == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.mode == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x, emb):
        h = self.in_layers[1](self.in_layers[0](x))
        h, x = self.resample(h), self.resample(x)
        h = self.in_layers[2](h)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            s, b = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + s) + b
        else:
            h = self.out_layers[0](h + e)
        h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        return self.skip_connection(x) + h


class Attn(nn.Module):
    def __init__(self, ch, heads, legacy):
        super().__init__()
        self.heads, self.legacy = heads, legacy
        self.norm = gn(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        flat = x.reshape(b, c, hh * ww)
        qkv = self.qkv(self.norm(flat))
        d = c // self.heads
        if self.legacy:  # heads first: (b, heads, 3, d, T)
            q, k, v = qkv.reshape(b, self.heads, 3, d, -1).unbind(2)
        else:  # q/k/v first: (b, 3, heads, d, T)
            q, k, v = qkv.reshape(b, 3, self.heads, d, -1).unbind(1)
        scale = d ** -0.25  # the reference scales q and k each (more stable in fp16)
        w = torch.softmax(torch.einsum("bhdt,bhds->bhts", q * scale, k * scale), dim=-1)
        a = torch.einsum("bhts,bhds->bhdt", w, v).reshape(b, c, -1)
        return (flat + self.proj_out(a)).reshape(b, c, hh, ww)


class Down(nn.Module):
    def __init__(self, ch, use_conv):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x):
        return self.op(x)


class Up(nn.Module):
    def __init__(self, ch, use_conv):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Seq(nn.ModuleList):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, Res) else layer(x)
        return x


class TorchADM(nn.Module):
    """Takes the same keyword arguments as ``jharm.models.adm.ADMConfig`` (subset)."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 channel_mult, num_heads=1, num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False,
                 resblock_updown=False, use_new_attention_order=False, conv_resample=True, cond_x1=False,
                 learn_sigma=False):
        super().__init__()
        mc, emb = model_channels, 4 * model_channels
        attn_ds = {image_size // r for r in attention_resolutions}
        up_heads = num_heads if num_heads_upsample == -1 else num_heads_upsample
        legacy = not use_new_attention_order
        nh = lambda c, h: h if num_head_channels == -1 else c // num_head_channels  # noqa: E731
        mk_res = lambda cin, cout, mode=None: Res(cin, emb, cout, use_scale_shift_norm, mode)  # noqa: E731
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.mc = mc
        ch = int(channel_mult[0] * mc)
        cin = in_channels * (2 if cond_x1 else 1)
        self.input_blocks = nn.ModuleList([Seq([nn.Conv2d(cin, ch, 3, padding=1)])])
        skip_ch, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [mk_res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in attn_ds:
                    layers.append(Attn(ch, nh(ch, num_heads), legacy))
                self.input_blocks.append(Seq(layers))
                skip_ch.append(ch)
            if level < len(channel_mult) - 1:
                self.input_blocks.append(Seq([mk_res(ch, ch, "down") if resblock_updown else Down(ch, conv_resample)]))
                skip_ch.append(ch)
                ds *= 2
        self.middle_block = Seq([mk_res(ch, ch), Attn(ch, nh(ch, num_heads), legacy), mk_res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            for i in range(num_res_blocks + 1):
                out = int(channel_mult[level] * mc)
                layers = [mk_res(ch + skip_ch.pop(), out)]
                ch = out
                if ds in attn_ds:
                    layers.append(Attn(ch, nh(ch, up_heads), legacy))
                if level > 0 and i == num_res_blocks:
                    layers.append(mk_res(ch, ch, "up") if resblock_updown else Up(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(Seq(layers))
        self.out = nn.Sequential(gn(ch), nn.SiLU(), nn.Conv2d(ch, out_channels * (2 if learn_sigma else 1), 3, padding=1))
        self.cond_x1 = cond_x1

    def forward(self, x, t, x1=None):
        if self.cond_x1:
            x = torch.cat([x, x1], dim=1)
        emb = self.time_embed(sinusoid(t, self.mc))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
