package simulator

// HCP's additions to govmomi 0.24.2's simulator, compiled into the
// package with `go build -overlay` (scripts/vcsim.sh); nothing of the
// library is changed.
//
//   - VirtualMachine.AcquireTicket: mks, webmks and device tickets (0.24.2
//     has none). A webmks ticket's URL is wss://<vcsim>/ticket/<ticket>.
//   - VirtualMachine.RebootGuest (0.24.2 answers MethodNotFound): like
//     vSphere, it needs a powered-on VM whose guest reports VMware Tools
//     running (guest.toolsRunningStatus), and answers ToolsUnavailable
//     otherwise; the VM stays on.
//   - HcpGuestTools: VMware Tools in the guests. vcsim 0.24.2 sets
//     guest.toolsStatus/toolsRunningStatus once, at create (not installed,
//     not running), and never again. Here every guest has Tools, which run
//     while the VM is powered on (toolsOk, guestToolsRunning) and not while
//     it is off (toolsNotRunning), as in a template with open-vm-tools; a VM
//     whose extraConfig "hcp.vcsim.guestTools" is "none" has none
//     (toolsNotInstalled, guestToolsNotRunning). The state follows every
//     power change (and is set for the inventory at start); the switch is
//     read then, so set it while the VM is off.
//   - AcquireTicket leaves out the fields the VM's extraConfig
//     "hcp.vcsim.ticketOmit" lists (comma separated: host, port, url), as
//     vSphere may: "if the host is not specified, the client is assumed to
//     know it", and url comes only from newer servers.
//   - HcpTicketHandler: a stand-in for the WebMKS server behind the ticket
//     URL (vcsim has nothing there). It accepts each ticket once, within
//     its lifetime, upgrades to a websocket (subprotocol "binary") and
//     speaks RFB 3.8 with no authentication (the ticket in the URL is the
//     credential), sending a ServerInit named "vcsim <vm name>".
//   - HcpDisks: the capacity of virtual disk files. vcsim 0.24.2 makes
//     empty files for disks and forgets the size asked for, so a disk that
//     no VM holds has none; vSphere keeps it in the disk. Here the size is
//     remembered by datastore path: from CreateVirtualDisk_Task's spec, and
//     from every VM device backed by the file (an attached disk grown by
//     ReconfigVM_Task). SearchDatastore_Task answers it in
//     VmDiskFileInfo.capacityKb when the query asks for it, as vSphere
//     does, and VirtualDiskManager gains ExtendVirtualDisk_Task (0.24.2
//     has none), which grows a disk file and refuses to shrink one.
//     CopyVirtualDisk_Task and MoveVirtualDisk_Task carry the size to the
//     new name, as vSphere's do (a copy or a move keeps the disk).

import (
	"bufio"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type hcpTicket struct {
	vm      string
	expires time.Time
}

var hcpTickets = struct {
	sync.Mutex
	m map[string]hcpTicket
}{m: map[string]hcpTicket{}}

func (vm *VirtualMachine) AcquireTicket(ctx *Context, req *types.AcquireTicket) soap.HasFault {
	body := &methods.AcquireTicketBody{}
	switch req.TicketType {
	case string(types.VirtualMachineTicketTypeMks), string(types.VirtualMachineTicketTypeWebmks), string(types.VirtualMachineTicketTypeDevice):
	default:
		body.Fault_ = Fault("", &types.InvalidArgument{InvalidProperty: "ticketType"})
		return body
	}
	if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		body.Fault_ = Fault("", &types.InvalidPowerState{
			RequestedState: types.VirtualMachinePowerStatePoweredOn,
			ExistingState:  vm.Runtime.PowerState,
		})
		return body
	}
	host, port := "127.0.0.1", int32(443)
	if ctx != nil && ctx.req != nil {
		if h, p, err := net.SplitHostPort(ctx.req.Host); err == nil {
			host = h
			fmt.Sscanf(p, "%d", &port)
		}
	}
	t := uuid.New().String()
	hcpTickets.Lock()
	hcpTickets.m[t] = hcpTicket{vm: vm.Name, expires: time.Now().Add(30 * time.Second)}
	hcpTickets.Unlock()
	res := types.VirtualMachineTicket{Ticket: t, CfgFile: vm.Config.Files.VmPathName, Host: host, Port: port}
	if req.TicketType == string(types.VirtualMachineTicketTypeWebmks) {
		res.Url = fmt.Sprintf("wss://%s/ticket/%s", net.JoinHostPort(host, fmt.Sprint(port)), t)
	}
	for _, field := range strings.Split(hcpExtraConfig(vm, hcpTicketOmitKey), ",") {
		switch strings.TrimSpace(field) {
		case "host":
			res.Host = ""
		case "port":
			res.Port = 0
		case "url":
			res.Url = ""
		}
	}
	body.Res = &types.AcquireTicketResponse{Returnval: res}
	return body
}

func (vm *VirtualMachine) RebootGuest(ctx *Context, req *types.RebootGuest) soap.HasFault {
	body := &methods.RebootGuestBody{}
	if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		body.Fault_ = Fault("", &types.InvalidPowerState{
			RequestedState: types.VirtualMachinePowerStatePoweredOn,
			ExistingState:  vm.Runtime.PowerState,
		})
		return body
	}
	if vm.Guest == nil || vm.Guest.ToolsRunningStatus != string(types.VirtualMachineToolsRunningStatusGuestToolsRunning) {
		body.Fault_ = Fault("Cannot complete operation because VMware Tools is not running in this virtual machine.", &types.ToolsUnavailable{})
		return body
	}
	ctx.postEvent(&types.VmGuestRebootEvent{VmEvent: vm.event()})
	body.Res = new(types.RebootGuestResponse)
	return body
}

// The extraConfig switches a test sets on a VM (ReconfigVM_Task).
const (
	hcpGuestToolsKey = "hcp.vcsim.guestTools"
	hcpTicketOmitKey = "hcp.vcsim.ticketOmit"
)

// hcpExtraConfig is the VM's extraConfig value for key, "" when unset.
// vcsim 0.24.2 appends every key a reconfigure sends, even one already
// there, so the last one is the current value.
func hcpExtraConfig(vm *VirtualMachine, key string) string {
	value := ""
	if vm.Config == nil {
		return value
	}
	for _, o := range vm.Config.ExtraConfig {
		if v := o.GetOptionValue(); v.Key == key {
			value, _ = v.Value.(string)
		}
	}
	return value
}

// hcpGuestTools keeps each VM's guest Tools state in step with its power
// state; a Registry handler, called after every property change.
type hcpGuestTools struct{}

func (hcpGuestTools) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "HcpGuestTools", Value: "hcp-guest-tools"}
}

func (hcpGuestTools) PutObject(mo.Reference) {}

func (hcpGuestTools) RemoveObject(types.ManagedObjectReference) {}

func (hcpGuestTools) UpdateObject(obj mo.Reference, changes []types.PropertyChange) {
	if obj.Reference().Type != "VirtualMachine" {
		return
	}
	for _, c := range changes {
		if c.Name == "runtime.powerState" {
			if vm, ok := Map.Get(obj.Reference()).(*VirtualMachine); ok {
				hcpSyncGuestTools(vm)
			}
			return
		}
	}
}

// hcpSyncGuestTools sets the VM's guest Tools state from its power state
// and its guestTools switch, through the Registry so that property
// collectors see the change.
func hcpSyncGuestTools(vm *VirtualMachine) {
	status, running := types.VirtualMachineToolsStatusToolsNotRunning, types.VirtualMachineToolsRunningStatusGuestToolsNotRunning
	switch {
	case hcpExtraConfig(vm, hcpGuestToolsKey) == "none":
		status = types.VirtualMachineToolsStatusToolsNotInstalled
	case vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn:
		status, running = types.VirtualMachineToolsStatusToolsOk, types.VirtualMachineToolsRunningStatusGuestToolsRunning
	}
	if vm.Guest != nil && vm.Guest.ToolsStatus == status && vm.Guest.ToolsRunningStatus == string(running) {
		return
	}
	Map.Update(vm, []types.PropertyChange{
		{Name: "guest.toolsStatus", Val: status},
		{Name: "guest.toolsRunningStatus", Val: string(running)},
		{Name: "summary.guest.toolsStatus", Val: status},
		{Name: "summary.guest.toolsRunningStatus", Val: string(running)},
	})
}

// HcpGuestTools makes guests report VMware Tools as described above: it
// sets the state of every VM in the inventory and follows power changes
// from then on. Call it once, after the model is created.
func HcpGuestTools() {
	Map.AddHandler(hcpGuestTools{})
	for _, obj := range Map.All("VirtualMachine") {
		if vm, ok := obj.(*VirtualMachine); ok {
			hcpSyncGuestTools(vm)
		}
	}
}

// HcpTicketHandler serves /ticket/<ticket>.
func HcpTicketHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t := strings.TrimPrefix(r.URL.Path, "/ticket/")
		hcpTickets.Lock()
		ticket, ok := hcpTickets.m[t]
		delete(hcpTickets.m, t)
		hcpTickets.Unlock()
		if !ok || time.Now().After(ticket.expires) {
			http.Error(w, "unknown or used ticket", http.StatusForbidden)
			return
		}
		key := r.Header.Get("Sec-WebSocket-Key")
		if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") || key == "" {
			http.Error(w, "a websocket upgrade is needed", http.StatusBadRequest)
			return
		}
		hj, ok := w.(http.Hijacker)
		if !ok {
			http.Error(w, "cannot hijack", http.StatusInternalServerError)
			return
		}
		conn, rw, err := hj.Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		sum := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
		fmt.Fprintf(rw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n", base64.StdEncoding.EncodeToString(sum[:]))
		for _, p := range strings.Split(r.Header.Get("Sec-WebSocket-Protocol"), ",") {
			if strings.TrimSpace(p) == "binary" {
				fmt.Fprint(rw, "Sec-WebSocket-Protocol: binary\r\n")
				break
			}
		}
		fmt.Fprint(rw, "\r\n")
		rw.Flush()
		ws := &hcpWebsocket{r: rw.Reader, w: conn}
		hcpServeRFB(ws, "vcsim "+ticket.vm)
	})
}

// hcpWebsocket is the server side of a websocket as a byte stream: reads
// unmask and join the client's binary frames, each write is one binary
// frame.
type hcpWebsocket struct {
	r       *bufio.Reader
	w       io.Writer
	pending []byte
}

func (c *hcpWebsocket) Read(p []byte) (int, error) {
	for len(c.pending) == 0 {
		var h [2]byte
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			return 0, err
		}
		opcode, masked, n := h[0]&0x0f, h[1]&0x80 != 0, uint64(h[1]&0x7f)
		switch n {
		case 126:
			var b [2]byte
			if _, err := io.ReadFull(c.r, b[:]); err != nil {
				return 0, err
			}
			n = uint64(binary.BigEndian.Uint16(b[:]))
		case 127:
			var b [8]byte
			if _, err := io.ReadFull(c.r, b[:]); err != nil {
				return 0, err
			}
			n = binary.BigEndian.Uint64(b[:])
		}
		if n > 1<<20 {
			return 0, fmt.Errorf("frame of %d bytes", n)
		}
		var mask [4]byte
		if masked {
			if _, err := io.ReadFull(c.r, mask[:]); err != nil {
				return 0, err
			}
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(c.r, payload); err != nil {
			return 0, err
		}
		for i := range payload {
			payload[i] ^= mask[i%4]
		}
		switch opcode {
		case 0x8:
			return 0, io.EOF
		case 0x0, 0x2:
			c.pending = payload
		}
	}
	n := copy(p, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}

func (c *hcpWebsocket) Write(p []byte) (int, error) {
	frame := []byte{0x82}
	switch {
	case len(p) < 126:
		frame = append(frame, byte(len(p)))
	case len(p) < 1<<16:
		frame = append(frame, 126, byte(len(p)>>8), byte(len(p)))
	default:
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(len(p)))
		frame = append(append(frame, 127), b[:]...)
	}
	if _, err := c.w.Write(append(frame, p...)); err != nil {
		return 0, err
	}
	return len(p), nil
}

// hcpServeRFB is an RFB 3.8 server without authentication and with a
// 64x48 screen, enough for a client to complete its handshake.
func hcpServeRFB(c io.ReadWriter, name string) {
	if _, err := io.WriteString(c, "RFB 003.008\n"); err != nil {
		return
	}
	version := make([]byte, 12)
	if _, err := io.ReadFull(c, version); err != nil || !strings.HasPrefix(string(version), "RFB 003.") {
		return
	}
	if _, err := c.Write([]byte{1, 1}); err != nil { // one security type: None
		return
	}
	choice := make([]byte, 1)
	if _, err := io.ReadFull(c, choice); err != nil || choice[0] != 1 {
		return
	}
	if _, err := c.Write([]byte{0, 0, 0, 0}); err != nil { // SecurityResult OK
		return
	}
	if _, err := io.ReadFull(c, choice); err != nil { // ClientInit
		return
	}
	init := make([]byte, 24, 24+len(name))
	binary.BigEndian.PutUint16(init[0:], 64)
	binary.BigEndian.PutUint16(init[2:], 48)
	// 32 bpp, depth 24, little endian, true colour, 255/255/255, shifts 16/8/0.
	copy(init[4:], []byte{32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0})
	binary.BigEndian.PutUint32(init[20:], uint32(len(name)))
	if _, err := c.Write(append(init, name...)); err != nil {
		return
	}
	io.Copy(io.Discard, c)
}

// hcpDiskSizes holds the capacity (KB) of disk files by datastore path
// ("[ds] dir/name.vmdk", cleaned).
var hcpDiskSizes = struct {
	sync.Mutex
	kb map[string]int64
}{kb: map[string]int64{}}

func hcpDiskKey(name string) string {
	var p object.DatastorePath
	if !p.FromString(name) {
		return name
	}
	return fmt.Sprintf("[%s] %s", p.Datastore, path.Clean(p.Path))
}

func hcpSetDiskSize(name string, kb int64) {
	if kb <= 0 || name == "" {
		return
	}
	hcpDiskSizes.Lock()
	hcpDiskSizes.kb[hcpDiskKey(name)] = kb
	hcpDiskSizes.Unlock()
}

func hcpDiskSize(name string) int64 {
	hcpDiskSizes.Lock()
	defer hcpDiskSizes.Unlock()
	return hcpDiskSizes.kb[hcpDiskKey(name)]
}

// hcpDisks follows every VM's disks: a device backed by a file says the
// file's capacity. A Registry handler, called after every property change.
type hcpDisks struct{}

func (hcpDisks) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "HcpDisks", Value: "hcp-disks"}
}

func (hcpDisks) PutObject(mo.Reference) {}

func (hcpDisks) RemoveObject(types.ManagedObjectReference) {}

func (hcpDisks) UpdateObject(obj mo.Reference, changes []types.PropertyChange) {
	if obj.Reference().Type != "VirtualMachine" {
		return
	}
	for _, c := range changes {
		if c.Name != "config.hardware.device" {
			continue
		}
		// The change is applied: read the devices from the VM.
		vm, ok := obj.(*mo.VirtualMachine)
		if !ok || vm.Config == nil {
			return
		}
		devices := vm.Config.Hardware.Device
		for _, d := range devices {
			disk, ok := d.(*types.VirtualDisk)
			if !ok {
				continue
			}
			if b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
				hcpSetDiskSize(b.GetVirtualDeviceFileBackingInfo().FileName, disk.CapacityInKB)
			}
		}
	}
}

// hcpVirtualDiskManager is vcsim's VirtualDiskManager remembering sizes,
// with ExtendVirtualDisk_Task.
// It embeds the value, not a pointer: vcsim's property collector digs the
// mo type out of the first field.
type hcpVirtualDiskManager struct {
	VirtualDiskManager
}

func (m *hcpVirtualDiskManager) CreateVirtualDiskTask(ctx *Context, req *types.CreateVirtualDisk_Task) soap.HasFault {
	existed := false
	if file, fault := Map.FileManager().resolve(req.Datacenter, req.Name); fault == nil {
		_, err := os.Stat(file)
		existed = err == nil
	}
	res := m.VirtualDiskManager.CreateVirtualDiskTask(ctx, req)
	if spec, ok := req.Spec.(*types.FileBackedVirtualDiskSpec); ok && !existed {
		hcpSetDiskSize(req.Name, spec.CapacityKb)
	}
	return res
}

func (m *hcpVirtualDiskManager) ExtendVirtualDiskTask(_ *Context, req *types.ExtendVirtualDisk_Task) soap.HasFault {
	task := CreateTask(m, "extendVirtualDisk", func(*Task) (types.AnyType, types.BaseMethodFault) {
		fm := Map.FileManager()
		file, fault := fm.resolve(req.Datacenter, req.Name)
		if fault != nil {
			return nil, fault
		}
		if _, err := os.Stat(file); err != nil {
			return nil, fm.fault(req.Name, err, new(types.FileNotFound))
		}
		if req.NewCapacityKb < hcpDiskSize(req.Name) {
			return nil, &types.InvalidArgument{InvalidProperty: "newCapacityKb"}
		}
		hcpSetDiskSize(req.Name, req.NewCapacityKb)
		return nil, nil
	})
	return &methods.ExtendVirtualDisk_TaskBody{
		Res: &types.ExtendVirtualDisk_TaskResponse{Returnval: task.Run()},
	}
}

// hcpDiskFiles runs vcsim's own copy or move of a disk's two files (the
// descriptor and its -flat extent), then gives the destination the
// source's size.
func hcpDiskFiles(req *types.CopyVirtualDisk_Task, move bool) (types.AnyType, types.BaseMethodFault) {
	fm := Map.FileManager()
	kb := hcpDiskSize(req.SourceName)
	dest := vdmNames(req.DestName)
	for i, name := range vdmNames(req.SourceName) {
		var fault types.BaseMethodFault
		if move {
			fault = fm.moveDatastoreFile(&types.MoveDatastoreFile_Task{
				SourceName:            name,
				SourceDatacenter:      req.SourceDatacenter,
				DestinationName:       dest[i],
				DestinationDatacenter: req.DestDatacenter,
				Force:                 req.Force,
			})
		} else {
			fault = fm.copyDatastoreFile(&types.CopyDatastoreFile_Task{
				SourceName:            name,
				SourceDatacenter:      req.SourceDatacenter,
				DestinationName:       dest[i],
				DestinationDatacenter: req.DestDatacenter,
				Force:                 req.Force,
			})
		}
		if fault != nil {
			return nil, fault
		}
	}
	hcpSetDiskSize(req.DestName, kb)
	return nil, nil
}

func (m *hcpVirtualDiskManager) CopyVirtualDiskTask(_ *Context, req *types.CopyVirtualDisk_Task) soap.HasFault {
	task := CreateTask(m, "copyVirtualDisk", func(*Task) (types.AnyType, types.BaseMethodFault) {
		return hcpDiskFiles(req, false)
	})
	return &methods.CopyVirtualDisk_TaskBody{
		Res: &types.CopyVirtualDisk_TaskResponse{Returnval: task.Run()},
	}
}

func (m *hcpVirtualDiskManager) MoveVirtualDiskTask(_ *Context, req *types.MoveVirtualDisk_Task) soap.HasFault {
	task := CreateTask(m, "moveVirtualDisk", func(*Task) (types.AnyType, types.BaseMethodFault) {
		return hcpDiskFiles(&types.CopyVirtualDisk_Task{
			SourceName:       req.SourceName,
			SourceDatacenter: req.SourceDatacenter,
			DestName:         req.DestName,
			DestDatacenter:   req.DestDatacenter,
			Force:            req.Force,
		}, true)
	})
	return &methods.MoveVirtualDisk_TaskBody{
		Res: &types.MoveVirtualDisk_TaskResponse{Returnval: task.Run()},
	}
}

// hcpDatastoreBrowser is vcsim's browser answering VmDiskFileInfo's
// capacityKb.
type hcpDatastoreBrowser struct {
	HostDatastoreBrowser
}

type hcpSearch struct {
	*searchDatastore
}

func (s hcpSearch) Run(task *Task) (types.AnyType, types.BaseMethodFault) {
	res, fault := s.searchDatastore.Run(task)
	if fault != nil {
		return res, fault
	}
	capacity := false
	for _, q := range s.SearchSpec.Query {
		if d, ok := q.(*types.VmDiskFileQuery); ok && d.Details != nil && d.Details.CapacityKb {
			capacity = true
		}
	}
	if !capacity {
		return res, nil
	}
	for _, r := range s.res {
		for _, f := range r.File {
			if disk, ok := f.(*types.VmDiskFileInfo); ok {
				disk.CapacityKb = hcpDiskSize(strings.TrimSuffix(r.FolderPath, "/") + "/" + disk.Path)
			}
		}
	}
	return res, nil
}

func (b *hcpDatastoreBrowser) SearchDatastoreTask(s *types.SearchDatastore_Task) soap.HasFault {
	search := hcpSearch{&searchDatastore{
		HostDatastoreBrowser: &b.HostDatastoreBrowser,
		DatastorePath:        s.DatastorePath,
		SearchSpec:           s.SearchSpec,
	}}
	task := CreateTask(b, "searchDatastore", search.Run)
	return &methods.SearchDatastore_TaskBody{
		Res: &types.SearchDatastore_TaskResponse{Returnval: task.Run()},
	}
}

// HcpDisks installs the disk sizes described above. Call it once, after
// the model is created.
func HcpDisks() {
	Map.AddHandler(hcpDisks{})
	if m, ok := Map.VirtualDiskManager().(*VirtualDiskManager); ok {
		Map.Put(&hcpVirtualDiskManager{*m})
	}
	for _, obj := range Map.All("Datastore") {
		if ds, ok := obj.(*Datastore); ok {
			if b, ok := Map.Get(ds.Browser).(*HostDatastoreBrowser); ok {
				Map.Put(&hcpDatastoreBrowser{*b})
			}
		}
	}
	for _, obj := range Map.All("VirtualMachine") {
		if vm, ok := obj.(*VirtualMachine); ok {
			hcpDisks{}.UpdateObject(&vm.VirtualMachine, []types.PropertyChange{{Name: "config.hardware.device"}})
		}
	}
}
