"""Float64 references written the plain way from each formula (probabilities, not log-probs)."""

from __future__ import annotations

import torch


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a log(a / b) over the last dim, with 0·log 0 = 0."""
    terms = torch.where(a > 0, a * torch.log(a / b), torch.zeros_like(a))
    return terms.sum(-1)


def ref_forward_kl(p, q, **_):
    return kl(p, q)


def ref_reverse_kl(p, q, **_):
    return kl(q, p)


def ref_symmetric_kl(p, q, beta=0.5, **_):
    return (1 - beta) * kl(p, q) + beta * kl(q, p)


def ref_jsd(p, q, beta=0.5, normalize=False, **_):
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    v = beta * kl(p, m) + (1 - beta) * kl(q, m)
    return v / (beta * (1 - beta)) if normalize else v


def ref_skew_forward_kl(p, q, alpha=0.1, **_):
    return kl(p, alpha * p + (1 - alpha) * q)


def ref_skew_reverse_kl(p, q, alpha=0.1, **_):
    return kl(q, (1 - alpha) * p + alpha * q)


def ref_tvd(p, q, **_):
    return 0.5 * (p - q).abs().sum(-1)


def ref_akl(p, q, mu=0.5, **_):
    """Loop over rows: sort the teacher descending, head = tokens until the mass reaches mu."""
    flat_p, flat_q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    out = []
    for pr, qr in zip(flat_p, flat_q, strict=True):
        order = sorted(range(len(pr)), key=lambda i: -float(pr[i]))
        head, mass = set(), 0.0
        for i in order:
            if mass >= mu:
                break
            head.add(i)
            mass += float(pr[i])
        g_head = sum(abs(float(pr[i] - qr[i])) for i in head)
        g_tail = sum(abs(float(pr[i] - qr[i])) for i in range(len(pr)) if i not in head)
        tot = g_head + g_tail
        wh, wt = (g_head / tot, g_tail / tot) if tot > 0 else (0.5, 0.5)
        out.append(wh * kl(pr, qr) + wt * kl(qr, pr))
    return torch.stack(out).reshape(p.shape[:-1])


REFERENCES = {
    "forward_kl": ref_forward_kl,
    "reverse_kl": ref_reverse_kl,
    "symmetric_kl": ref_symmetric_kl,
    "jsd": ref_jsd,
    "skew_forward_kl": ref_skew_forward_kl,
    "skew_reverse_kl": ref_skew_reverse_kl,
    "tvd": ref_tvd,
    "akl": ref_akl,
}

# parameter settings exercised per divergence
PARAMS = {
    "forward_kl": [{}],
    "reverse_kl": [{}],
    "symmetric_kl": [{"beta": 0.5}, {"beta": 0.2}],
    "jsd": [{"beta": 0.5}, {"beta": 0.1}, {"beta": 0.9, "normalize": True}, {"beta": 0.0}, {"beta": 1.0}],
    "skew_forward_kl": [{"alpha": 0.1}, {"alpha": 0.5}],
    "skew_reverse_kl": [{"alpha": 0.1}, {"alpha": 0.5}],
    "tvd": [{}],
    "akl": [{"mu": 0.5}, {"mu": 0.8}],
}
CASES = [(name, params) for name, plist in PARAMS.items() for params in plist]
