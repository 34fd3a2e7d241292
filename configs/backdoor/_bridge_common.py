"""Shared pieces of the bridge-backdoor configs (not a config file itself; docs/backdoor.md lists every field)."""
from jharm.train.defaults import base_config
from jharm.train.tasks.backdoor import default_task_config

# guided-diffusion's 256x256 ImageNet ADM as I2SB uses it (ADMConfig defaults = that network).
ADM_256 = dict(model_channels=256, num_res_blocks=2, attention_resolutions=(32, 16, 8), dropout=0.0,
               channel_mult=(1, 1, 2, 2, 4, 4), conv_resample=True, num_heads=4, num_head_channels=64,
               num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
               cond_x1=False, use_checkpoint=True, norm_groups=32)
DATASETS = ("imagenet", "celebahq")


def image256_config(name: str, phase: str, dataset: str):
    """I2SB at 256x256 on a user image folder (ImageNet or CelebA-HQ), I2SB's training settings."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset {dataset!r} is not one of {DATASETS}")
    c = base_config()
    # I2SB: AdamW lr 5e-5 (l2 0), EMA 0.99, batch 256, no gradient clipping, StepLR x0.99 every 1000
    # steps. The engine has no step schedule: a cosine to the same final ratio (0.99^100 over 100k steps).
    c.train.update(steps=100_000, batch_size=256, log_every=100, ckpt_every=5000, ema_decay=0.99)
    c.optim.update(name="adamw", lr=5e-5, weight_decay=0.0, clip_norm=0.0, schedule="cosine",
                   final_lr_ratio=0.99 ** 100)
    c.mesh.update(data=-1, fsdp=1, tensor=1, rules="fsdp")
    c.task = default_task_config(name, phase)
    t = c.task
    t.data.update(source="folder", folder="", eval_folder="", image_size=256, corruption="sr4x-pool")
    t.adm.update(ADM_256)
    t.bridge.update(interval=1000, beta_max=0.3, ot_ode=False)
    t.sample.nfe = 100
    # Start from guided-diffusion's unconditional 256x256 ImageNet checkpoint, as I2SB does
    # (256x256_diffusion_uncond.pt; the learned-sigma channels are dropped).
    t.init_path = ""
    t.init_from_adm = True
    return c
