"""S3 provisioner: the buckets, and the Delta tables' schemas inside the lake bucket.

Credentials come from the caller (the operator reads the Secret named in secretRef; the CLI
uses the standard AWS environment variables); they are never logged. Plain-HTTP endpoints
are used only when the spec says allowHttp. Nothing is ever dropped: a missing column is
added, a bucket or table that vanished is created again (empty, as it must be).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import DeltaTable, Field, Schema
from deltalake.exceptions import TableNotFoundError

from tradingstack import lake
from tradingstack.api import S3Endpoint
from tradingstack.changes import BackendResult, Change, ItemStatus, Problem, UnreachableError
from tradingstack.lake import ALL_TABLES, REPORTS, LakeTable, tables_at
from tradingstack.plan import OWNER_PREFIX, Plan

# Written into a bucket the operator creates, holding the creating stack's owner mark.
OWNER_OBJECT = ".tradingstack-owner"


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)

    def __repr__(self) -> str:  # never print the secret, even in a traceback
        return f"S3Credentials(access_key_id={self.access_key_id[:4]}...)"


@dataclass
class S3Provisioner:
    endpoint: S3Endpoint
    credentials: S3Credentials | None
    backend = "buckets"

    def _filesystem(self) -> pafs.S3FileSystem:
        scheme, _, host = self.endpoint.endpoint.partition("://")
        creds = self.credentials
        return pafs.S3FileSystem(
            access_key=creds.access_key_id if creds else None,
            secret_key=creds.secret_access_key if creds else None,
            anonymous=creds is None,
            endpoint_override=host.rstrip("/"),
            scheme=scheme,
            region=self.endpoint.region,
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
            connect_timeout=3,
            request_timeout=10,
        )

    def storage_options(
        self, max_retries: int | None = None, retry_timeout_seconds: float | None = None
    ) -> dict[str, str]:
        creds = self.credentials
        return lake.storage_options(
            self.endpoint.endpoint,
            self.endpoint.region,
            self.endpoint.allow_http,
            creds.access_key_id if creds else None,
            creds.secret_access_key if creds else None,
            max_retries,
            retry_timeout_seconds,
        )

    def _uri(self, table: LakeTable) -> str:
        return table.uri(self.endpoint.bucket)

    def reconcile(self, plan: Plan, dry_run: bool = False) -> BackendResult:
        result = BackendResult(self.backend, dry_run=dry_run)
        fs = self._filesystem()
        for bucket in plan.buckets:
            try:
                info = fs.get_file_info(bucket)
            except OSError as exc:
                raise UnreachableError(f"S3 at {self.endpoint.endpoint}: {exc}") from exc
            if info.type == pafs.FileType.NotFound:
                result.changes.append(Change("create", "Bucket", bucket))
                if not dry_run:
                    fs.create_dir(bucket)
                    with fs.open_output_stream(f"{bucket}/{OWNER_OBJECT}") as marker:  # made by this stack
                        marker.write(plan.stack.owner.encode())
                result.items.append(ItemStatus(bucket, not dry_run, "InSync" if not dry_run else "Missing"))
            else:
                result.items.append(ItemStatus(bucket, True, "InSync"))
        lake_ready = any(i.name == self.endpoint.bucket and i.ready for i in result.items)
        for table in tables_at(plan.lake_tables):
            if lake_ready:
                try:
                    # Appended to only, with each commit's stream identity: shareable. ptrc's reports replace a
                    # day's rows in place, which would replace another stack's: never shared.
                    shared = plan.spec.lake is not None and plan.spec.lake.shared and table != REPORTS
                    self._delta_table(table, result, plan.stack.owner, shared)
                except OSError as exc:
                    # deltalake reports transport failures as OSError with the cause in the text.
                    if "connect" in str(exc).lower():
                        raise UnreachableError(f"S3 at {self.endpoint.endpoint}: {exc}") from exc
                    raise
            elif dry_run:  # the lake bucket itself is missing, so are its tables
                name = f"{self.endpoint.bucket}/{table.path}"
                result.changes.append(Change("create", "DeltaTable", name))
                result.items.append(ItemStatus(name, False, "Missing"))
        return result

    def _delta_table(self, table: LakeTable, result: BackendResult, owner: str, shared: bool = False) -> None:
        name = f"{self.endpoint.bucket}/{table.path}"
        options = self.storage_options()
        try:
            live = DeltaTable(self._uri(table), storage_options=options)
        except TableNotFoundError:
            result.changes.append(Change("create", "DeltaTable", name))
            if not result.dry_run:
                DeltaTable.create(
                    self._uri(table), table.schema, partition_by=list(table.partition_by), storage_options=options,
                    description=owner,  # made by this stack: its to delete
                )  # fmt: skip
            result.items.append(ItemStatus(name, not result.dry_run, "InSync" if not result.dry_run else "Missing"))
            return
        holder = live.metadata().description or ""
        if holder.startswith(OWNER_PREFIX) and holder != owner and not shared:
            message = (f"Delta table {name} was made by {holder.removeprefix(OWNER_PREFIX)}; give this stack a bucket "
                       "of its own (spec.infrastructure.s3.bucket), or set spec.lake.shared: true to write into it "
                       "on purpose")  # fmt: skip
            result.problems.append(Problem("DeltaTable", name, "OwnedByAnotherStack", message))
            result.items.append(ItemStatus(name, False, "OwnedByAnotherStack", message))
            return
        present = {f.name for f in live.schema().fields}
        missing = [f for f in table.schema if f.name not in present]
        if missing:
            names = ", ".join(f.name for f in missing)
            result.changes.append(Change("update", "DeltaTable", name, f"add columns {names}"))
            if not result.dry_run:
                live.alter.add_columns(_added_columns(missing))
            reason = "InSync" if not result.dry_run else "Drifted"
            result.items.append(
                ItemStatus(name, not result.dry_run, reason, "" if not result.dry_run else f"missing {names}")
            )
            return
        result.items.append(ItemStatus(name, True, "InSync"))

    def delete(self, plan: Plan) -> list[Change]:
        """Remove what this stack made and nothing else: a bucket it created (marker object) goes
        whole; in a bucket it did not create, only the Delta tables it created go."""
        fs = self._filesystem()
        owner = plan.stack.owner
        deleted = []
        try:
            for bucket in plan.buckets:
                if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    continue
                if self._marker(fs, bucket) == owner:
                    fs.delete_dir(bucket)  # objects first, then the bucket
                    deleted.append(Change("delete", "Bucket", bucket))
                    continue
                if bucket != self.endpoint.bucket:
                    continue
                for table in ALL_TABLES:  # whatever this stack made, enabled now or not
                    try:
                        made_by = DeltaTable(self._uri(table), storage_options=self.storage_options()).metadata()
                    except TableNotFoundError:
                        continue
                    if made_by.description == owner:
                        fs.delete_dir(f"{bucket}/{table.path}")
                        deleted.append(Change("delete", "DeltaTable", f"{bucket}/{table.path}"))
        except OSError as exc:
            raise UnreachableError(f"S3 at {self.endpoint.endpoint}: {exc}") from exc
        return deleted

    @staticmethod
    def _marker(fs: pafs.S3FileSystem, bucket: str) -> str | None:
        try:
            with fs.open_input_stream(f"{bucket}/{OWNER_OBJECT}") as marker:
                return bytes(marker.read()).decode(errors="replace")
        except FileNotFoundError:  # not made by the operator
            return None


def _added_columns(fields: list[pa.Field]) -> list[Field]:
    """Added columns are nullable: the rows already written have no value for them."""
    return list(Schema.from_arrow(pa.schema([f.with_nullable(True) for f in fields])).fields)
