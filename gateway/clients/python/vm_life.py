"""A VM's life through HCP's REST API, driven by a client that
openapi-python-client generated from the document the gateway serves
(cli/tests/contract.rs generates it into a temporary directory and runs
this program with that directory on PYTHONPATH as the package
`hcp_client`).

Create with an Idempotency-Key (and the same request again: the same
answer), wait for the job, read, stop, resize, a bad flavor answered with
the document's Error model, delete. Every answer is parsed by the
generated models; an answer of another type than the step expects fails
the program with what came back.

Environment: HCP_URL (the gateway), HCP_TOKEN (a tenant.member token for
HCP_PROJECT), HCP_PROJECT.
"""

import os
import sys
import time
import uuid

from hcp_client import AuthenticatedClient
from hcp_client.api.job_service import get_job
from hcp_client.api.vm_service import create_vm
from hcp_client.api.vm_service import delete_vm
from hcp_client.api.vm_service import get_vm
from hcp_client.api.vm_service import resize_vm
from hcp_client.api.vm_service import stop_vm
from hcp_client.models import (
    Error,
    Job,
    JobStatus,
    Vm,
    VmOperationAccepted,
    CreateVmBody,
    ResizeVmBody,
    StopVmBody,
    VmStatus,
)
from hcp_client.models.error_code import ErrorCode

JOB_DEADLINE_SECONDS = 60


def expect(response, model, status):
    """The parsed answer, checked to be `model` with HTTP `status`."""
    parsed = response.parsed
    if not isinstance(parsed, model) or response.status_code != status:
        raise AssertionError(
            f"expected {status} {model.__name__}, got {response.status_code} "
            f"{type(parsed).__name__}: {response.content.decode(errors='replace')}"
        )
    return parsed


def wait_job(client, job_id):
    """Polls the job until it ends; it must succeed."""
    deadline = time.monotonic() + JOB_DEADLINE_SECONDS
    while True:
        job = expect(get_job.sync_detailed(uuid.UUID(job_id), client=client), Job, 200)
        if job.status == JobStatus.SUCCEEDED:
            return job
        if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise AssertionError(f"job {job_id} ({job.kind}) ended {job.status}: {job.error}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} ({job.kind}) still {job.status} after {JOB_DEADLINE_SECONDS} s")
        time.sleep(0.1)


def read(client, project, vm_id):
    return expect(get_vm.sync_detailed(project, uuid.UUID(vm_id), client=client), Vm, 200)


def main():
    url, token, project = os.environ["HCP_URL"], os.environ["HCP_TOKEN"], os.environ["HCP_PROJECT"]
    client = AuthenticatedClient(base_url=url, token=token, raise_on_unexpected_status=True)
    name = f"py-{uuid.uuid4().hex[:8]}"
    key = str(uuid.uuid4())

    body = CreateVmBody(name=name, flavor="small", image="debian-12")
    created = expect(
        create_vm.sync_detailed(project, client=client, body=body, idempotency_key=key),
        VmOperationAccepted,
        202,
    )
    again = expect(
        create_vm.sync_detailed(project, client=client, body=body, idempotency_key=key),
        VmOperationAccepted,
        202,
    )
    assert (again.vm_id, again.job_id) == (created.vm_id, created.job_id), (
        f"the same Idempotency-Key got another answer: {again} after {created}"
    )
    print(f"created {name}: vm {created.vm_id}, job {created.job_id} (replayed with the same key)")
    wait_job(client, created.job_id)

    vm = read(client, project, created.vm_id)
    assert (vm.name, vm.flavor, vm.status) == (name, "small", VmStatus.ACTIVE), vm
    print(f"read: {vm.status}, {vm.vcpus} vCPU, {vm.memory_mib} MiB")

    stopped = expect(
        stop_vm.sync_detailed(project, uuid.UUID(vm.vm_id), client=client, body=StopVmBody()),
        VmOperationAccepted,
        202,
    )
    wait_job(client, stopped.job_id)
    vm = read(client, project, created.vm_id)
    assert vm.status == VmStatus.STOPPED, vm
    print("stopped")

    resized = expect(
        resize_vm.sync_detailed(
            project, uuid.UUID(vm.vm_id), client=client, body=ResizeVmBody(flavor="medium")
        ),
        VmOperationAccepted,
        202,
    )
    wait_job(client, resized.job_id)
    vm = read(client, project, created.vm_id)
    assert (vm.flavor, vm.vcpus, vm.status) == ("medium", 2, VmStatus.STOPPED), vm
    print(f"resized to {vm.flavor}: {vm.vcpus} vCPU, {vm.memory_mib} MiB")

    bad = resize_vm.sync_detailed(
        project, uuid.UUID(vm.vm_id), client=client, body=ResizeVmBody(flavor="no-such-flavor")
    )
    error = expect(bad, Error, 400)
    assert error.code == ErrorCode.INVALID_ARGUMENT, error
    assert error.details["field"] == "flavor", error
    assert error.message and error.trace_id, error
    print(f"bad flavor: {bad.status_code} {error.code} field={error.details['field']}: {error.message}")

    deleted = expect(
        delete_vm.sync_detailed(project, uuid.UUID(vm.vm_id), client=client),
        VmOperationAccepted,
        202,
    )
    wait_job(client, deleted.job_id)
    vm = read(client, project, created.vm_id)
    assert vm.status == VmStatus.DELETED, vm
    print("deleted")
    print("vm life: ok")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"vm life failed: {e}", file=sys.stderr)
        sys.exit(1)
