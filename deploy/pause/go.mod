module wasmkubelet.local/pause

go 1.24
