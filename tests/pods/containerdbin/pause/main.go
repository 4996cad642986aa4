// Command pause is the sandbox ("pause") container of the pods profile's node: it holds a pod's
// namespaces, sleeps, and exits at once on SIGTERM or SIGINT. Built static, it is the whole image.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}
