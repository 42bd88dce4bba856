"""TorchServe's management API as :class:`~dlrm_serve.client.Client` methods
(list, describe, register, scale, set the default version, unregister).

The methods go through ``self._manage(op, ...)``, which the client runs with
its management key, renewals and retries, over either transport.
"""

from __future__ import annotations

from typing import Any

from dlrm_serve.errors import ServerError, UsageError

__all__ = ["Management"]


class Management:
    """Management calls; mixed into :class:`~dlrm_serve.client.Client`, which provides ``_manage`` and ``model``."""

    def list_models(self, limit: int = 100) -> list[dict]:
        """Every registered model (``modelName``, ``modelUrl``), all pages."""
        if limit <= 0:
            # TorchServe's gRPC ListModels lists nothing with limit 0.
            raise UsageError(f"limit must be positive, got {limit}")
        out: list[dict] = []
        token: int | None = None
        seen = set()
        while True:
            page = self._manage("list_models", limit, token)
            if not isinstance(page, dict):
                raise ServerError(f"ListModels answered {str(page)[:200]}")
            out.extend(page.get("models", []))
            nxt = page.get("nextPageToken")
            if nxt in (None, "") or nxt in seen:
                return out
            seen.add(nxt)
            token = int(nxt)

    def describe_model(self, name: str | None = None, version: str | None = None, *, customized: bool = False) -> list[dict]:
        """TorchServe's description of a model (versions, workers, batch settings)."""
        return self._manage("describe_model", name or self.model, version, customized)

    def register_model(
        self,
        url: str,
        model_name: str | None = None,
        *,
        batch_size: int | None = None,
        max_batch_delay: int | None = None,
        initial_workers: int | None = None,
        synchronous: bool = True,
        response_timeout: int | None = None,
        startup_timeout: int | None = None,
        handler: str | None = None,
    ) -> Any:
        """Register an archive (a name in the model store, or a URL TorchServe allows)."""
        params = dict(
            url=url,
            model_name=model_name,
            batch_size=batch_size,
            max_batch_delay=max_batch_delay,
            initial_workers=initial_workers,
            synchronous=synchronous,
            response_timeout=response_timeout,
            startup_timeout=startup_timeout,
            handler=handler,
        )
        return self._manage("register_model", **{k: v for k, v in params.items() if v is not None})

    def scale_workers(
        self,
        name: str | None = None,
        min_worker: int = 1,
        max_worker: int | None = None,
        *,
        version: str | None = None,
        synchronous: bool = True,
        timeout: int | None = None,
    ) -> Any:
        """Set a model's worker count (``max_worker`` defaults to ``min_worker``)."""
        params = dict(
            model_name=name or self.model,
            model_version=version,
            min_worker=min_worker,
            max_worker=max_worker if max_worker is not None else min_worker,
            synchronous=synchronous,
            timeout=timeout,
        )
        return self._manage("scale_workers", **{k: v for k, v in params.items() if v is not None})

    def set_default(self, name: str, version: str) -> Any:
        """Make ``version`` the version that unversioned requests reach."""
        return self._manage("set_default", name, version)

    def unregister_model(self, name: str, version: str | None = None) -> Any:
        return self._manage("unregister_model", name, version)
