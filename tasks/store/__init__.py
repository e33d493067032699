"""Write-once result store and failure ledger; ``python -m tasks.store`` checks them."""

from __future__ import annotations

from tasks.store.ledger import FailureLedger
from tasks.store.worm import ResultStore, StoreError, VerifyReport, result_key

__all__ = ["FailureLedger", "ResultStore", "StoreError", "VerifyReport", "result_key"]
