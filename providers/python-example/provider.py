#!/usr/bin/env python3
"""An out-of-tree HCP provider in Python: an in-memory hypervisor speaking
hcp.provider.v1 over gRPC (grpcio), generated at start from the same
provider.proto HCP uses, with VMs and volumes. It is an example for
vendors, small on purpose, and it passes HCP's conformance kit.

Run:  python3 provider.py --listen 127.0.0.1:50071
It prints {"hcp_ready":{"service":"provider-python","addr":"HOST:PORT"}}
on stdout when it serves, like every HCP process.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import uuid
from concurrent import futures

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
PROTO = "hcp/provider/v1/provider.proto"


def load_stubs():
    """Generates the Python stubs for provider.proto into a temp dir."""
    out = tempfile.mkdtemp(prefix="hcp-provider-py-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", PROTO])
    if rc != 0:
        sys.exit(f"cannot compile {PROTO} (protoc exit {rc})")
    sys.path.insert(0, out)
    from hcp.provider.v1 import provider_pb2, provider_pb2_grpc  # noqa: E402
    # Loaded: the generated files are not needed any more, and a provider
    # that is killed would leave them behind.
    sys.path.remove(out)
    shutil.rmtree(out, ignore_errors=True)
    return provider_pb2, provider_pb2_grpc


pb, rpc = load_stubs()


# Seconds a graceful stop would wait for the guest when the request says 0.
DEFAULT_STOP_TIMEOUT = 60

# Data volume slots per VM (Capabilities.max_volumes_per_vm).
MAX_VOLUMES_PER_VM = 16


def log(message):
    """Operator log on stderr (stdout carries the readiness line)."""
    print(message, file=sys.stderr, flush=True)


def valid_id(vm_id):
    try:
        return str(uuid.UUID(vm_id)) == vm_id
    except ValueError:
        return False


class Hypervisor:
    """The VMs and volumes, keyed by HCP ids; every method is idempotent by id."""

    def __init__(self):
        self.lock = threading.Lock()
        self.vms = {}
        # Volume id -> {"native", "size", "vm" (HCP VM id or ""), "slot"}.
        # Everything here is HCP's; a real provider marks its volumes (a
        # label, a name prefix) and lists only those.
        self.volumes = {}
        self.next_native = 0

    def volume_info(self, volume_id):
        v = self.volumes[volume_id]
        return pb.VolumeInfo(volume_id=volume_id, size_gib=v["size"], native_id=v["native"],
                             vm_id=v["vm"], slot=v["slot"])

    def info(self, vm_id):
        vm = self.vms[vm_id]
        # One NIC per network of the spec, in order, with a MAC derived from
        # the VM id and the NIC's position (this hypervisor has no DHCP, so
        # no addresses).
        nics = [pb.InterfaceInfo(network=net, mac="52:54:00:" + ":".join(
                    hashlib.sha256(f"{vm_id}/{i}".encode()).hexdigest()[j:j + 2] for j in (0, 2, 4)))
                for i, net in enumerate(vm["networks"])]
        return pb.VmInfo(vm_id=vm_id, power_state=vm["power"], native_id=vm["native"],
                         vcpus=vm["vcpus"], memory_mib=vm["memory"], disk_gib=vm["disk"],
                         interfaces=nics)


class Identity(rpc.IdentityServicer):
    def GetPluginInfo(self, request, context):
        return pb.PluginInfo(name="python-example.hcp.dev", vendor_version="0.1.0",
                             protocol_versions=["1"], hypervisor="python-example")

    def GetCapabilities(self, request, context):
        return pb.Capabilities(supports_cloud_init=True, supports_resize=True,
                               supports_volumes=True, supports_hot_attach=True,
                               supports_volume_extend_in_use=True,
                               max_volumes_per_vm=MAX_VOLUMES_PER_VM,
                               attributes={"language": "python"})

    def Probe(self, request, context):
        return pb.ProbeResponse(ready=True, message="ready")


class Compute(rpc.ComputeServicer):
    def __init__(self, hv):
        self.hv = hv

    def _known(self, vm_id, context):
        if not valid_id(vm_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"vm_id must be a UUID, got {vm_id!r}")
        if vm_id not in self.hv.vms:
            context.abort(grpc.StatusCode.NOT_FOUND, f"vm {vm_id} not found")

    def CreateVm(self, request, context):
        if not valid_id(request.vm_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"vm_id must be a UUID, got {request.vm_id!r}")
        if not request.HasField("spec"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec is required")
        spec = request.spec
        with self.hv.lock:
            if request.vm_id not in self.hv.vms:
                # Volumes first, all checked before anything changes: the
                # boot volume (used as it is, or made at the spec's disk
                # size) at slot 0, the data volumes at their slots.
                wanted = ([(spec.boot_volume_id, 0)] if spec.boot_volume_id else []) + \
                    [(a.volume_id, a.slot) for a in spec.volumes]
                for volume_id, slot in wanted:
                    if not valid_id(volume_id):
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"volume id {volume_id!r} is no UUID")
                    v = self.hv.volumes.get(volume_id)
                    if v is None and slot > 0:
                        context.abort(grpc.StatusCode.NOT_FOUND, f"volume {volume_id} not found")
                    if v is not None and v["vm"]:
                        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                      f"volume {volume_id} is attached to vm {v['vm']}")
                for volume_id, slot in wanted:
                    if volume_id not in self.hv.volumes:
                        self.hv.next_native += 1
                        self.hv.volumes[volume_id] = {
                            "native": f"py-vol-{self.hv.next_native}", "size": max(spec.disk_gib, 1),
                            "vm": "", "slot": 0,
                        }
                    self.hv.volumes[volume_id]["vm"] = request.vm_id
                    self.hv.volumes[volume_id]["slot"] = slot
                self.hv.next_native += 1
                self.hv.vms[request.vm_id] = {
                    "native": f"py-{self.hv.next_native}",
                    "power": pb.RUNNING if request.start else pb.SHUTOFF,
                    "vcpus": request.spec.vcpus,
                    "memory": request.spec.memory_mib,
                    "disk": request.spec.disk_gib,
                    # What each network is here: the operator's mapping if
                    # core sent one, else the network's own name.
                    "networks": [n.backing or n.network for n in request.spec.networks],
                }
            return self.hv.info(request.vm_id)

    def GetVm(self, request, context):
        with self.hv.lock:
            self._known(request.vm_id, context)
            return self.hv.info(request.vm_id)

    def ListVms(self, request, context):
        with self.hv.lock:
            ids = sorted(i for i in self.hv.vms if i > request.page_token)
            size = request.page_size or 1000
            page, rest = ids[:size], ids[size:]
            return pb.ListVmsResponse(vms=[self.hv.info(i) for i in page],
                                      next_page_token=page[-1] if rest else "")

    def _power(self, vm_id, context, power):
        with self.hv.lock:
            self._known(vm_id, context)
            self.hv.vms[vm_id]["power"] = power
            return self.hv.info(vm_id)

    def StartVm(self, request, context):
        return self._power(request.vm_id, context, pb.RUNNING)

    def StopVm(self, request, context):
        """force: power off at once. Otherwise ask the guest, and power off
        when it has not stopped after timeout_seconds (0: our default). The
        guests here always obey, so both end the same way; a real provider
        waits for the guest between the two steps."""
        with self.hv.lock:
            self._known(request.vm_id, context)
            vm = self.hv.vms[request.vm_id]
            if vm["power"] != pb.SHUTOFF:
                how = "power off" if request.force else \
                    f"ask the guest, power off after {request.timeout_seconds or DEFAULT_STOP_TIMEOUT} s"
                log(f"vm {request.vm_id}: stop ({how})")
                vm["power"] = pb.SHUTOFF
            return self.hv.info(request.vm_id)

    def RebootVm(self, request, context):
        """hard: the reset button; otherwise ask the guest to restart."""
        with self.hv.lock:
            self._known(request.vm_id, context)
            if self.hv.vms[request.vm_id]["power"] != pb.RUNNING:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "vm is not running")
            log(f"vm {request.vm_id}: reboot ({'reset' if request.hard else 'ask the guest'})")
            return self.hv.info(request.vm_id)

    def ResizeVm(self, request, context):
        """Stopped VMs only (supports_hot_resize is not declared); disks grow."""
        with self.hv.lock:
            if not request.vcpus or not request.memory_mib:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "vcpus and memory_mib must be positive")
            self._known(request.vm_id, context)
            vm = self.hv.vms[request.vm_id]
            if vm["power"] == pb.RUNNING:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stop the vm to resize it")
            if request.disk_gib and request.disk_gib < vm["disk"]:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"disk_gib {request.disk_gib} is below the disk's {vm['disk']}; disks only grow")
            vm["vcpus"], vm["memory"] = request.vcpus, request.memory_mib
            vm["disk"] = request.disk_gib or vm["disk"]
            return self.hv.info(request.vm_id)

    def DeleteVm(self, request, context):
        """Deletes the VM and its own disk, never a volume: its volumes stay, detached."""
        if not valid_id(request.vm_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "vm_id must be a UUID")
        with self.hv.lock:
            existed = self.hv.vms.pop(request.vm_id, None) is not None
            for v in self.hv.volumes.values():
                if v["vm"] == request.vm_id:
                    v["vm"], v["slot"] = "", 0
        return pb.DeleteVmResponse(existed=existed)

    # Volumes: every call checks all it needs before it changes anything,
    # under the one lock, so a refused call changes nothing.

    def _volume(self, volume_id, context):
        if not valid_id(volume_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"volume_id must be a UUID, got {volume_id!r}")
        if volume_id not in self.hv.volumes:
            context.abort(grpc.StatusCode.NOT_FOUND, f"volume {volume_id} not found")
        return self.hv.volumes[volume_id]

    def CreateVolume(self, request, context):
        """Idempotent by volume id: an existing volume is returned as it is."""
        if not valid_id(request.volume_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_id must be a UUID")
        if request.spec.size_gib < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec.size_gib must be at least 1")
        if request.spec.storage not in ("", "default"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no storage {request.spec.storage!r}")
        with self.hv.lock:
            if request.volume_id not in self.hv.volumes:
                self.hv.next_native += 1
                self.hv.volumes[request.volume_id] = {
                    "native": f"py-vol-{self.hv.next_native}", "size": request.spec.size_gib,
                    "vm": "", "slot": 0,
                }
            return self.hv.volume_info(request.volume_id)

    def GetVolume(self, request, context):
        with self.hv.lock:
            self._volume(request.volume_id, context)
            return self.hv.volume_info(request.volume_id)

    def ListVolumes(self, request, context):
        with self.hv.lock:
            ids = sorted(i for i in self.hv.volumes if i > request.page_token)
            size = request.page_size or 1000
            page, rest = ids[:size], ids[size:]
            return pb.ListVolumesResponse(volumes=[self.hv.volume_info(i) for i in page],
                                          next_page_token=page[-1] if rest else "")

    def ExtendVolume(self, request, context):
        """Grows only; a size already reached succeeds. Extending in use is
        declared (supports_volume_extend_in_use), so a running VM is no bar."""
        with self.hv.lock:
            v = self._volume(request.volume_id, context)
            if request.size_gib < v["size"]:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"size_gib {request.size_gib} is below the volume's {v['size']}; volumes only grow")
            v["size"] = request.size_gib
            return self.hv.volume_info(request.volume_id)

    def AttachVolume(self, request, context):
        """Already attached there succeeds; another VM or a taken slot is
        FAILED_PRECONDITION. Hot attach is declared, so power is no bar."""
        if not 1 <= request.slot <= MAX_VOLUMES_PER_VM:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"slot must be 1 to {MAX_VOLUMES_PER_VM}")
        with self.hv.lock:
            v = self._volume(request.volume_id, context)
            self._known(request.vm_id, context)
            if (v["vm"], v["slot"]) == (request.vm_id, request.slot):
                return self.hv.volume_info(request.volume_id)
            if v["vm"]:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"volume {request.volume_id} is attached to vm {v['vm']} at slot {v['slot']}")
            for other_id, other in self.hv.volumes.items():
                if (other["vm"], other["slot"]) == (request.vm_id, request.slot):
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"slot {request.slot} of vm {request.vm_id} holds volume {other_id}")
            v["vm"], v["slot"] = request.vm_id, request.slot
            return self.hv.volume_info(request.volume_id)

    def DetachVolume(self, request, context):
        """A volume not attached to that VM, or gone, succeeds."""
        if not valid_id(request.volume_id) or not valid_id(request.vm_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_id and vm_id must be UUIDs")
        with self.hv.lock:
            v = self.hv.volumes.get(request.volume_id)
            if v is None:
                return pb.VolumeInfo(volume_id=request.volume_id)
            if v["vm"] == request.vm_id:
                v["vm"], v["slot"] = "", 0
            return self.hv.volume_info(request.volume_id)

    def DeleteVolume(self, request, context):
        """Attached is FAILED_PRECONDITION; gone answers existed=false."""
        if not valid_id(request.volume_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_id must be a UUID")
        with self.hv.lock:
            v = self.hv.volumes.get(request.volume_id)
            if v is None:
                return pb.DeleteVolumeResponse(existed=False)
            if v["vm"]:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"volume {request.volume_id} is attached to vm {v['vm']}; detach it first")
            del self.hv.volumes[request.volume_id]
            return pb.DeleteVolumeResponse(existed=True)

    def GetConsole(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{request.protocol} consoles are not supported")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50071")
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    rpc.add_IdentityServicer_to_server(Identity(), server)
    rpc.add_ComputeServicer_to_server(Compute(Hypervisor()), server)
    host = args.listen.rsplit(":", 1)[0]
    port = server.add_insecure_port(args.listen)
    server.start()
    print(json.dumps({"hcp_ready": {"service": "provider-python", "addr": f"{host}:{port}"}}), flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
