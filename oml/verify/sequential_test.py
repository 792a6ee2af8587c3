"""The statistics of "is this deployed model ours?": p0 from reference models, the binomial p-value, and the
sequential rule that stops revealing keys as soon as the verdict is decided.

H0: the suspect does not carry our fingerprints, so each key we send matches its response with probability at
most p0, independently. Under H0 the number of matches X among n keys is at most Binomial(n, p0) in the
stochastic order, so the p-value of m matches is the exact binomial tail P(X >= m | n, p0) (scipy.stats.binom).

p0 is measured, not assumed: the run's keys are sent to reference models that do not carry them (the base
model, copies fingerprinted with other keys), with the same match rule as the API check, and p0 is the
Clopper-Pearson *upper* confidence bound of their pooled per-key match rate (scipy.stats.beta). Why the upper
bound: the measured rate k/n of a few dozen trials is often 0, and "p0 = 0" would make a single match
infinitely significant. The bound is the largest rate still consistent with what was seen: with confidence c,
the true rate is below it, so the p-values computed with it are valid unless the reference measurement was
unluckily low (probability at most 1 - c). With no match in n trials it is 1 - (1 - c)^(1/n) ≈ -ln(1 - c) / n,
about 3/n at c = 0.95. How large n must be: if every key of the suspect matches, the verdict needs m keys with
p0^m <= alpha, i.e. p0 <= alpha^(1/m). At alpha = 1e-6, m = 5 keys need p0 <= 0.063 (n >= 47 clean trials at
95%), m = 4 keys need p0 <= 0.032 (n >= 94). Trials are keys x reference models, so 64 keys on two reference
models give n = 128.

Sequential rule, checked after every batch of answers, with at most `budget` keys in all:
    "ours"       as soon as P(X >= m | n, p0) <= alpha (m matches among the n keys answered so far);
    "not shown"  as soon as even all budget - n remaining keys matching could not bring the tail to alpha,
                 or when the budget is spent.
Each batch is exactly the number of keys that no outcome can spare (`keys_needed`): until then neither verdict
is reachable, so one key at a time would reveal them all the same.

Looking after every batch is a repeated test, and a repeated test at level alpha claims more often than alpha
(at p0 0.2, alpha 0.01 and 6 keys: 1.18%). So the rule above runs at a per-look level `look_alpha` <= alpha,
the largest for which the whole procedure's false-claim probability under H0 -- computed exactly by
`false_claim_probability`, a dynamic program over (keys answered, matches) -- is at most alpha. The p-value
reported is the binomial tail at the stop; the verdict "ours" means the sequential procedure, not only that
one look, is at level alpha.
"""

import functools
import math
import random

import numpy as np
from scipy.stats import beta, binom

DEFAULT_ALPHA = 1e-6
DEFAULT_CONFIDENCE = 0.95


def clopper_pearson_upper(matches, trials, confidence=DEFAULT_CONFIDENCE):
    """One-sided upper confidence bound for a binomial rate after `matches` successes in `trials`."""
    if trials <= 0:
        return 1.0
    if matches >= trials:
        return 1.0
    return float(beta.ppf(confidence, matches + 1, trials - matches))


def p_value(matches, n, p0):
    """Exact binomial tail P(X >= matches | n, p0); 1.0 for no keys."""
    if n <= 0 or matches <= 0:
        return 1.0
    return float(binom.sf(matches - 1, n, p0))


@functools.lru_cache(maxsize=65536)
def matches_needed(n, p0, alpha=DEFAULT_ALPHA):
    """The fewest matches among n keys with P(X >= m | n, p0) <= alpha (n + 1 when even n cannot)."""
    if n <= 0:
        return 1
    tails = binom.sf(np.arange(n), n, p0)  # P(X >= m) for m = 1..n, decreasing
    below = np.nonzero(tails <= alpha)[0]
    return int(below[0]) + 1 if len(below) else n + 1


def decide(matches, n, p0, alpha=DEFAULT_ALPHA, budget=None):
    """'ours', 'not shown', or None (undecided) after `matches` of `n` keys, with at most `budget` keys in all."""
    if n > 0 and matches >= matches_needed(n, p0, alpha):
        return "ours"
    budget = n if budget is None else budget
    if n >= budget or matches + budget - n < matches_needed(budget, p0, alpha):
        return "not shown"
    return None


def keys_needed(matches, n, p0, alpha=DEFAULT_ALPHA, budget=None):
    """How many more keys must be answered before any verdict is possible (0 when decided already).

    The smaller of: the fewest further keys that, all matching, give "ours", and the fewest that, all
    missing, give "not shown". Fewer keys than this cannot decide either way, whatever their outcomes."""
    if decide(matches, n, p0, alpha, budget) is not None:
        return 0
    budget = n if budget is None else budget
    for j in range(1, budget - n + 1):
        if decide(matches + j, n + j, p0, alpha, budget) == "ours" or decide(matches, n + j, p0, alpha, budget):
            return j
    return max(budget - n, 1)


def run_sequential(outcomes, p0, alpha=DEFAULT_ALPHA, budget=None, batch=None):
    """Apply the sequential rule to a sequence of per-key outcomes (bools) in order.

    Returns (verdict, keys revealed, matches). `batch` caps the keys sent at once (None: no cap)."""
    budget = len(outcomes) if budget is None else min(budget, len(outcomes))
    matches = n = 0
    while True:
        verdict = decide(matches, n, p0, alpha, budget)
        if verdict is not None:
            return verdict, n, matches
        step = keys_needed(matches, n, p0, alpha, budget)
        step = min(step, batch) if batch else step
        matches += sum(bool(x) for x in outcomes[n : n + step])
        n += step


def false_claim_probability(p0, alpha=DEFAULT_ALPHA, budget=16, batch=None):
    """Exact probability that run_sequential says "ours" when every key matches independently with probability p0.

    Dynamic programming over the states (keys answered, matches) the rule can be in; each undecided state sends
    its next batch, whose match count is Binomial(step, p0)."""
    states = {(0, 0): 1.0}
    claimed, pmf = 0.0, {}
    for _ in range(budget + 1):  # every step answers at least one key
        nxt = {}
        for (n, m), prob in states.items():
            verdict = decide(m, n, p0, alpha, budget)
            if verdict == "ours":
                claimed += prob
                continue
            if verdict is not None:
                continue
            step = keys_needed(m, n, p0, alpha, budget)
            step = min(step, batch) if batch else step
            if step not in pmf:
                pmf[step] = binom.pmf(np.arange(step + 1), step, p0).tolist()
            for k, q in enumerate(pmf[step]):
                key = (n + step, m + k)
                nxt[key] = nxt.get(key, 0.0) + prob * q
        if not nxt:
            break
        states = nxt
    return claimed


@functools.lru_cache(maxsize=256)
def look_alpha(p0, alpha=DEFAULT_ALPHA, budget=16, batch=None, iterations=40):
    """The largest per-look level (bisection on a log scale) whose sequential false-claim probability is <= alpha.

    Only levels verified by false_claim_probability are returned, so the answer is valid even where the
    probability is not monotone in the level."""
    if false_claim_probability(p0, alpha, budget, batch) <= alpha:
        return alpha
    lo, hi = math.log(alpha) - 10 * math.log(10), math.log(alpha)  # the procedure at alpha / 1e10 never claims
    if false_claim_probability(p0, math.exp(lo), budget, batch) > alpha:
        return 0.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if false_claim_probability(p0, math.exp(mid), budget, batch) <= alpha:
            lo = mid
        else:
            hi = mid
    return math.exp(lo)


def simulate(outcomes, p0, alpha=DEFAULT_ALPHA, budget=16, batch=None, draws=100, seed=0):
    """Run the sequential check `draws` times on keys drawn at random (without replacement) from measured per-key
    outcomes. Returns [(verdict, keys revealed, matches)], one per draw."""
    rng = random.Random(seed)
    results = []
    for _ in range(draws):
        order = list(outcomes)
        rng.shuffle(order)
        results.append(run_sequential(order, p0, alpha, budget, batch))
    return results
