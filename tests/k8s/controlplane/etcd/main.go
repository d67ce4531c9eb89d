// Command etcd is etcd's own server main (go.etcd.io/etcd/server/v3/etcdmain), built from
// the version this module pins.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
