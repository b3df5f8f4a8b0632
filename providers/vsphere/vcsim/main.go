// hcp-vcsim: VMware's vCenter simulator (govmomi's simulator library, as
// Debian packages it) with what HCP's vSphere tests need around it:
// TLS with a certificate the test made, per-method delays, and the
// additions in the overlay (see overlay/hcp_additions.go and
// scripts/vcsim.sh). Written for HCP; the library is Apache-2.0.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	model := simulator.VPX()
	flag.IntVar(&model.Cluster, "cluster", model.Cluster, "clusters per datacenter")
	flag.IntVar(&model.ClusterHost, "host", model.ClusterHost, "hosts per cluster")
	flag.IntVar(&model.Datastore, "ds", model.Datastore, "local datastores")
	flag.IntVar(&model.Machine, "vm", model.Machine, "VMs per resource pool")
	listen := flag.String("l", "127.0.0.1:0", "listen address")
	user := flag.String("username", "", "the only user allowed to log in (any when empty)")
	pass := flag.String("password", "", "that user's password")
	certFile := flag.String("tls-cert", "", "PEM certificate to serve (a generated one when empty)")
	keyFile := flag.String("tls-key", "", "PEM key of -tls-cert")
	delay := flag.Int("delay", 0, "delay of every SOAP method, in ms")
	methodDelay := flag.String("method-delay", "", "per-method delays: Name=ms,Name=ms")
	flag.BoolVar(&simulator.Trace, "trace", false, "trace SOAP to stderr")
	flag.Parse()

	model.DelayConfig.Delay = *delay
	if *methodDelay != "" {
		model.DelayConfig.MethodDelay = map[string]int{}
		for _, kv := range strings.Split(*methodDelay, ",") {
			name, ms, ok := strings.Cut(kv, "=")
			n, err := strconv.Atoi(ms)
			if !ok || err != nil {
				log.Fatalf("-method-delay: %q is not Name=ms", kv)
			}
			model.DelayConfig.MethodDelay[name] = n
		}
	}
	u := &url.URL{Host: *listen}
	if *user != "" {
		u.User = url.UserPassword(*user, *pass)
	}
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	// Guests run VMware Tools while powered on (overlay).
	simulator.HcpGuestTools()
	// Disk files keep their size (overlay).
	simulator.HcpDisks()
	model.Service.RegisterEndpoints = true
	model.Service.Listen = u
	model.Service.TLS = new(tls.Config)
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("-tls-cert: %v", err)
		}
		model.Service.TLS.Certificates = []tls.Certificate{cert}
	}
	// The WebMKS endpoint behind AcquireTicket's URLs (overlay).
	model.Service.HandleFunc("/ticket/", simulator.HcpTicketHandler().ServeHTTP)
	s := model.Service.NewServer()
	// One line the tests wait for: where the SDK is.
	fmt.Printf("HCP_VCSIM_URL=%s\n", s.URL)
	os.Stdout.Sync()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	model.Remove()
}
