"""The episode-boundary invariants, for every script, on real observations.

1. Chunking: one call over [0, T) equals [0, k) then [k, T) with the returned state.
2. Reset: from a start at k on, outputs equal a fresh `initial_state` run on the suffix, whatever came before.
3. Rollout/training agreement: T calls of one step equal one call over T steps (and, in a real run,
   summary.json's `first_minibatch_ratio_error` is below 1e-5: see test_training.py).
"""

import pytest
import torch
from conftest import DOMAINS, ENVS, STEPS, assert_one_step_calls_equal_one_call, load, outputs, rollout_batch

ATOL = 1e-5


def assert_states_close(a, b):
    if a is None or b is None:
        assert a is None and b is None
        return
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def warm_state(agent, obs, starts, actions):
    """A state that has seen other observations: the invariants must hold from any state, not just zeros."""
    _, state = outputs(agent, obs.flip(0), agent.initial_state(ENVS, obs.device), starts, actions.flip(0))
    return state


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("split", [1, 5, STEPS - 1])
def test_chunking(module, domain, split, device):
    agent, obs, starts, actions = rollout_batch(module, domain, device)
    starts[0] = 0  # continue from a warm state
    state = warm_state(agent, obs, starts, actions)
    whole, whole_state = outputs(agent, obs, state, starts, actions)
    first, mid_state = outputs(agent, obs[:split], state, starts[:split], actions[:split])
    second, end_state = outputs(agent, obs[split:], mid_state, starts[split:], actions[split:])
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=ATOL, rtol=0)
    assert_states_close(end_state, whole_state)


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("start", [3, 8])
def test_reset_at_a_start_forgets_everything_before(module, domain, start, device):
    agent, obs, starts, actions = rollout_batch(module, domain, device)
    starts[start] = 1
    fresh, _ = outputs(agent, obs[start:], agent.initial_state(ENVS, device), starts[start:], actions[start:])
    # From zeros the sequence starts an episode at step 0; from a warm state it carries that state through the
    # prefix: the start must forget the state and the prefix alike
    warm, other_prefix = warm_state(agent, obs, starts, actions), obs[:start].flip(0)  # another history before
    for prefix_state, first_step_starts in ((agent.initial_state(ENVS, device), 1), (warm, 0)):
        starts[0] = first_step_starts
        whole, _ = outputs(agent, torch.cat([other_prefix, obs[start:]]), prefix_state, starts, actions)
        torch.testing.assert_close(whole[:, start:], fresh, atol=ATOL, rtol=0)


@pytest.mark.parametrize("domain", DOMAINS)
def test_one_step_calls_equal_one_sequence_call(module, domain, device):
    assert_one_step_calls_equal_one_call(*rollout_batch(module, domain, device), atol=ATOL)


def test_no_state_reset_carries_memory_across_starts(script, device):
    """`--no-state-reset` is the paper's leak: after a start the outputs still depend on the old episode."""
    module = load(script)
    if not hasattr(module.Args, "no_state_reset"):
        pytest.skip(f"{script.name} has no memory to leak")
    argv = [*DOMAINS["classic"], "--no-state-reset"]
    agent, obs, starts, _ = rollout_batch(module, "classic", device, argv=argv)
    starts[3] = 1
    with torch.no_grad():  # the trunk's features: the heads start near zero (policy std 0.01) and hide them
        fresh, _ = agent.features(obs[3:], agent.initial_state(ENVS, device), starts[3:])
        whole, _ = agent.features(obs, agent.initial_state(ENVS, device), starts)
    assert (whole[3:] - fresh).abs().max() > 1e-3
