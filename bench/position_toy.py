"""Can the shapes U-Net learn place words at all? A toy that isolates it (issue #4).

Every training image holds one object and its caption names color, shape and grid cell ("a red circle at
the top left"); noise levels are log-normal with --p-mean/--p-std (default 1.0 / 1.2: sigma > 5 for ~30% of
images, where layout is decided). The U-Net is the shapes-t2i preset's, fresh, with --pos none or sincos
(2-D position features in the spatial transformers). Every 50 steps it prints the layout probe of
bench/layout_probe.py on 32 pure-noise inputs at sigma 20 / 5 / 2: (sigma, mean |D| difference between
"... at the top left" and "... at the bottom right", the same between "a red circle ..." and "a blue
square ..." at the top left, share of the top-left prompt's brightness in cell 0; 1/9 = no idea of place).

--captions relation trains on the world's position family instead ("a red circle above a blue square": two objects
whose cells satisfy the relation), and the probe adds the relation words' mean |D| difference and, for "... above
..." and "... below ...", how far below the blue object's mass the red one's sits (bench/layout_probe.py).

--mix P draws that share of the training examples from the full shapes world instead (its six caption families,
uniformly; most name no place), to find how much of the world's other data stops place words being learned.

--text-aux W adds W x a token-identity loss on the built-in text encoder: each output token, scored against every
word's input embedding (logits = out @ E^T), must name its own word (cross-entropy). It makes the encoder keep words
apart that the denoising loss lets it merge ("above" / "below" end 3.5% apart in the shipped model); the probe then
adds that distance (bench/layout_probe.py's text_separation). The test: does the relation follow once the words differ?

--init MODEL starts from a trained text model's weights (a shipped name or a model folder; its vocabulary, its U-Net
with --pos added, the new position projections starting at zero) instead of a fresh network: can a model that
already draws the world learn place words quickly? --out DIR writes the result as a model folder that
`diffuse train --set train.init_from=DIR` can continue from (a fresh network then gets the full world's vocabulary).

    python bench/position_toy.py --steps 1200 --pos sincos
    python bench/position_toy.py --steps 1200 --pos sincos --mix 0.5
    python bench/position_toy.py --steps 800 --init runs/shapes-base --lr 2e-4 --bf16 --out runs/toy-from-shapes
"""
import argparse, dataclasses, random, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffuse import checkpoint, shapes
from diffuse.config import ModelConfig, preset
from diffuse.data import to_tensor
from diffuse.model import DiffusionModel
from diffuse.text import WordTokenizer
from diffuse.losses import denoising_loss
from diffuse.pipeline import resolve_model
from diffuse.train import TrainingError, load_initial_weights
from layout_probe import RELATION_PAIR, WORD_SWAPS, cell_shares, red_below_blue, text_separation  # bench/layout_probe.py
import torch.nn.functional as F

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--steps", type=int, default=1200, help="optimizer steps")
ap.add_argument("--batch", type=int, default=32, help="images per step")
ap.add_argument("--pos", default="sincos", choices=["none", "sincos"], help="position features of the U-Net")
ap.add_argument("--p-mean", type=float, default=1.0, help="mean of ln sigma")
ap.add_argument("--p-std", type=float, default=1.2, help="std of ln sigma")
ap.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (50 warmup steps)")
ap.add_argument("--bf16", action="store_true", help="bf16 autocast (where the CPU multiplies bf16 natively)")
ap.add_argument("--channels", type=int, default=None, help="U-Net model_channels of a fresh network (default 64)")
ap.add_argument("--captions", default="place", choices=["place", "relation"],
                help="one object and its cell, or the position family's two objects and their relation")
ap.add_argument("--mix", type=float, default=0.0, help="share of examples drawn from the full shapes world (0-1)")
ap.add_argument("--text-aux", type=float, default=0.0, help="weight of the text encoder's token-identity loss (0 = off)")
ap.add_argument("--init", default="", help="start from this text model's weights (shipped name or folder)")
ap.add_argument("--out", default="", help="write the final weights as a model folder here (must not exist)")
args = ap.parse_args()
if not 0 <= args.mix <= 1:
    ap.error(f"--mix must be in [0, 1], got {args.mix}")
if args.init and args.channels is not None:
    ap.error("--channels sets a fresh network's width; --init takes the model's own")
if args.out and Path(args.out).exists():
    ap.error(f"--out {args.out} exists; choose a new folder")
torch.manual_seed(0)
cfg = preset("shapes-t2i")
def example(rng):
    """(scene, caption): one object whose caption names its cell, or with probability --mix a full-world example."""
    if args.mix and rng.random() < args.mix:
        ex = shapes.sample(rng.randrange(2**31))
        return ex.scene, ex.caption
    if args.captions == "relation":
        ex = shapes.sample(rng.randrange(2**31), family="position")
        return ex.scene, ex.caption
    color, shape = rng.choice(shapes.TRAIN_PAIRS)
    cell = rng.randrange(9)
    obj = shapes.place(rng, shape, color, rng.choice(shapes.SIZES), cell)
    return shapes.Scene((obj,)), shapes.noun_phrase(1, shape, color, None, cell)
rng = random.Random(0)
if args.init:
    try:  # the model's own config (vocabulary, widths) plus --pos; its weights load as train.init_from's do
        src = ModelConfig(**checkpoint.load_model_config(resolve_model(args.init))["model"])
        if src.conditioning != "text" or src.image_size != 32:
            ap.error(f"--init {args.init}: not a 32x32 text-to-image model")
        mcfg = dataclasses.replace(src, backbone_config={**src.backbone_config, "position_embedding": args.pos})
        model = DiffusionModel(mcfg)
        load_initial_weights(model, dataclasses.replace(cfg, model=mcfg, train=dataclasses.replace(cfg.train, init_from=args.init)),
                             lambda line: print(line, flush=True))
    except (FileNotFoundError, checkpoint.CheckpointError, TrainingError) as e:
        ap.error(f"--init {args.init}: {e}")
else:
    caps = [example(rng)[1] for _ in range(2000)] + ["a red circle"] + (shapes.vocabulary() if args.mix or args.out or args.captions == "relation" else [])
    tok = WordTokenizer.from_captions(caps).to_dict()
    bc = {**cfg.model.backbone_config, "position_embedding": args.pos, "model_channels": args.channels or 64}
    model = DiffusionModel(dataclasses.replace(cfg.model, backbone_config=bc,
                                               text_config={**cfg.model.text_config, "tokenizer": tok}))
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0)
g = torch.Generator().manual_seed(0)
PROMPTS = ("a red circle at the top left", "a red circle at the bottom right", "a blue square at the top left")
def probe():
    model.eval(); out = []
    with torch.no_grad():
        for sigma in (20.0, 5.0, 2.0):
            x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * sigma
            s = torch.full((32,), sigma)
            d = [model.denoise(x, s, model.condition(prompts=[p] * 32)) for p in PROMPTS + RELATION_PAIR]
            diff = (d[0] - d[1]).abs().mean().item()
            relation = [round((d[3] - d[4]).abs().mean().item(), 4), round(red_below_blue(d[3]), 3), round(red_below_blue(d[4]), 3)]
            out.append((sigma, round(diff, 4), round((d[0] - d[2]).abs().mean().item(), 4), round(cell_shares(d[0])[0], 3), *relation))
        out.append(("above/below in the encoder", *(round(v, 3) for v in text_separation(model, *WORD_SWAPS[0]))))
    model.train(); return out
def token_identity_loss(prompts, cond):
    """--text-aux: cross-entropy of each encoder output token (cond's, the denoiser's input) against all input word
    embeddings, target its own word."""
    enc = model.text_encoder
    ids, _ = enc.tokenizer.encode(prompts)
    logits = cond["text"] @ enc.token_embedding.weight.T  # [B, L, V]
    mask = cond["text_mask"]
    return F.cross_entropy(logits[mask].float(), ids[mask])
t0 = time.time()
for step in range(1, args.steps + 1):
    lr = args.lr * min(1, step / 50)
    for gr in opt.param_groups: gr["lr"] = lr
    ex = [example(rng) for _ in range(args.batch)]
    x0 = torch.stack([to_tensor(shapes.render(scene, 32)) for scene, _ in ex])
    prompts = [c if rng.random() > 0.1 else "" for _, c in ex]
    sigma = (args.p_mean + args.p_std * torch.randn(args.batch, generator=g)).exp()
    noise = torch.randn(x0.shape, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        cond = model.condition(prompts=prompts)
        loss = denoising_loss(cfg.loss, model.denoiser, x0, sigma, noise, cond).mean()
        aux = token_identity_loss(prompts, cond) if args.text_aux else torch.zeros(())
    loss_total = loss + args.text_aux * aux
    opt.zero_grad(); loss_total.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 50 == 0 or step == 10:
        print(f"step {step} loss {loss.item():.4f} token-identity {aux.item():.3f} {time.time()-t0:.0f}s probe(sigma, place diff, content diff, share cell0, relation diff, red below blue for above, for below) {probe()}", flush=True)

if args.out:
    print("wrote", model.save(Path(args.out)))
