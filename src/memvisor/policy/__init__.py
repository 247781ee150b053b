"""The memory scheduler and its baselines: pure ``plan(snapshot) -> decisions`` policies.

``get_policy(name, **settings)`` builds one: ``memvisor`` (entitlements with an idle memory
tax, free-memory states, share-aware victims, balloon before swap), ``mom`` (oVirt MOM),
``proxmox`` (Proxmox VE autoballoon) or ``none``. See ``docs/policy.md``.
"""

from memvisor.policy.base import Policy, PoolInfo
from memvisor.policy.registry import POLICIES, get_policy

__all__ = ["POLICIES", "Policy", "PoolInfo", "get_policy"]
