// go-hello: a first Wasm pod in Go (docs/first-wasm-pod.md). Built with
// GOOS=wasip1 GOARCH=wasm, it runs as a WASI preview 1 module: it greets whoever the
// pod's GREETING_NAME says, lists its arguments and the files of its /config volume, and
// exits 0 (the pod Succeeds).
package main

import (
	"fmt"
	"os"
	"runtime"
)

func main() {
	name := os.Getenv("GREETING_NAME")
	if name == "" {
		name = "world"
	}
	fmt.Printf("Hello, %s, from Go on %s/%s!\n", name, runtime.GOOS, runtime.GOARCH)
	for i, arg := range os.Args[1:] {
		fmt.Printf("arg %d: %s\n", i+1, arg)
	}
	entries, err := os.ReadDir("/config")
	if err != nil {
		fmt.Fprintf(os.Stderr, "no /config volume: %v\n", err)
		return
	}
	for _, e := range entries {
		text, err := os.ReadFile("/config/" + e.Name())
		if err != nil {
			continue
		}
		fmt.Printf("/config/%s: %s\n", e.Name(), text)
	}
}
