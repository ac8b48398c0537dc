// pause: the sandbox ("pause") program of the bench's peer node (deploy/peer-node). It holds a
// pod's namespaces open and does nothing else: it sleeps until SIGTERM or SIGINT, then exits 0.
// No public pause image can be pulled here, so deploy/build-kubelet builds this one statically
// (CGO_ENABLED=0) and pushes it as $REGISTRY/pause:bench. The bench also runs it as the trivial
// container of the runc pods, so both sides of a comparison run a program that only waits.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
