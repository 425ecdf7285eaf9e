"""Admission, in order: who is asking (tenant), may they (rate limits), is there room (queue),
and when it runs (dispatcher). Every refusal is counted by reason."""

from __future__ import annotations

from pdmesh import metrics
from pdmesh.errors import DeadlineError, PdmeshError, PermissionDeniedError, UnauthenticatedError
from pdmesh.scheduler.admission import Ticket
from pdmesh.scheduler.dispatcher import Dispatcher
from pdmesh.scheduler.prefix_affinity import PromptBlocks
from pdmesh.scheduler.request_spec import GenerationSpec
from pdmesh.scheduler.router import Assignment
from pdmesh.scheduler.tenants import Tenant, TenantDirectory


class AdmissionControl:
    def __init__(self, tenants: TenantDirectory, dispatcher: Dispatcher):
        self.tenants = tenants
        self.dispatcher = dispatcher

    def authenticate(self, authorization: str | None, cluster_secret: str | None = None) -> Tenant:
        try:
            return self.tenants.authenticate(authorization, cluster_secret)
        except UnauthenticatedError:
            metrics.REJECTIONS.labels(reason="unauthenticated").inc()
            raise

    def authorize_admin(self, authorization: str | None, cluster_secret: str | None = None) -> None:
        """Operator calls (cluster status: worker addresses and pids) need an admin tenant's key
        when tenants are configured."""
        try:
            self.tenants.authorize_admin(authorization, cluster_secret)
        except (UnauthenticatedError, PermissionDeniedError):
            metrics.REJECTIONS.labels(reason="unauthenticated").inc()
            raise

    async def admit(self, spec: GenerationSpec, tenant: Tenant, timeout_s: float | None) -> Assignment:
        """Wait until the request may run; its tokens stay charged to the tenant until finish()."""
        tokens = spec.num_tokens
        try:
            self.tenants.charge(tenant, tokens)
        except PdmeshError as exc:
            self._rejected(_reason(exc), tokens)
            raise
        ticket = Ticket(tenant, spec.priority, tokens, num_prompt_tokens=len(spec.prompt_ids),
                        prompt=PromptBlocks(spec.prompt_ids))
        try:
            assignment = await self.dispatcher.submit(ticket, timeout_s)
        except BaseException as exc:
            self.tenants.refund(tenant, tokens)
            if isinstance(exc, PdmeshError):
                self._rejected(_reason(exc), tokens)
            raise
        metrics.ADMITTED_TOKENS.inc(tokens)
        return assignment

    def finish(self, tenant: Tenant, unused_tokens: int) -> None:
        """Give back what was reserved and not generated (early stop, error)."""
        self.tenants.refund(tenant, unused_tokens)

    @staticmethod
    def _rejected(reason: str, tokens: int) -> None:
        metrics.REJECTIONS.labels(reason=reason).inc()
        metrics.REJECTED_TOKENS.inc(tokens)


def _reason(exc: PdmeshError) -> str:
    """queue_full, displaced, rate_limited (from the error class), deadline, unavailable, ..."""
    reason = getattr(exc, "rejection_reason", None)
    if reason:
        return reason
    return "deadline" if isinstance(exc, DeadlineError) else type(exc).__name__.removesuffix("Error").lower()
