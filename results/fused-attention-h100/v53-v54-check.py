"""The check that `v53c-check-d0e74e3.txt`, `v53d-check.txt`, `v53e-check.txt` and `v54-check.txt` ran on the H100 (as
`.exp/dbg.py`, at the trees in their headers): one
attention layer with `saturated_attention.ENABLED` off and on, at 1 x 2048 (no padding and 1500 tokens) and 2 x 1000
(the second 700 tokens); relative L2 between the two, the largest difference per head, rows off by more than 1e-2;
exit 3 if any relative L2 is not under 1e-3. `deberta_tools/saturated_attention.py` exists only at those trees
(bd4054d ... ba26891), so this runs there, not at HEAD.
"""
import sys; sys.path.insert(0, '.')
import torch
worst = 0.0
from deberta_tools import fused_attention as fa, inputs, saturated_attention as sa, compare
for batch, seq, pad in ((1, 2048, None), (1, 2048, 1500), (2, 1000, 700)):
    qkv, positions, mask = inputs.attention_layer(seq, batch)
    if pad:
        mask[-1, pad:] = 0
    outs = []
    for on in (False, True):
        sa.ENABLED = on
        outs.append(fa.attention(qkv, mask, 6, 64, positions, 0.07).float())
    d = (outs[1] - outs[0]).abs()
    print(batch, seq, pad, 'rel', compare.relative_l2(outs[1].cpu().numpy(), outs[0].cpu().numpy()),
          'max row err by head', [round(float(d[..., h*64:(h+1)*64].max()), 4) for h in range(6)],
          'rows with err>1e-2', int((d.amax(-1) > 1e-2).sum()))
    worst = max(worst, compare.relative_l2(outs[1].cpu().numpy(), outs[0].cpu().numpy()))
    bad = (d.amax(-1) > 1e-2).nonzero()
    print('  first bad rows', bad[:8].tolist(), 'last', bad[-4:].tolist())
sys.exit(3 if not worst < 1e-3 else 0)
