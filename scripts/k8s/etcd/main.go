// Command etcd is the etcd server, built from the etcd server module so that
// the operator's integration tests can run a real API server store.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
