// A tiny hashicorp/raft node for bench/failover.py: TCP transport, in-memory log, stable
// and snapshot stores, library defaults (DefaultConfig). It serves
//
//	GET  /status -> {"state": "Leader", "term": 3, "leader": "127.0.0.1:7001"}
//	POST /apply  -> 200 once a no-op command is committed through this node (the leader),
//	                503 otherwise
//
// Build (Debian): GOPATH=/usr/share/gocode GO111MODULE=off go build -o raftnode main.go
package main

import (
	"encoding/json"
	"flag"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/raft"
)

type fsm struct{}

func (fsm) Apply(*raft.Log) interface{}         { return nil }
func (fsm) Snapshot() (raft.FSMSnapshot, error) { return snapshot{}, nil }
func (fsm) Restore(r io.ReadCloser) error       { return r.Close() }

type snapshot struct{}

func (snapshot) Persist(sink raft.SnapshotSink) error { return sink.Close() }
func (snapshot) Release()                             {}

func main() {
	id := flag.String("id", "", "server id")
	addr := flag.String("raft", "", "raft address host:port")
	httpAddr := flag.String("http", "", "http address host:port")
	peers := flag.String("peers", "", "id=host:port,... (all voters)")
	bootstrap := flag.Bool("bootstrap", false, "bootstrap the cluster with -peers")
	flag.Parse()

	conf := raft.DefaultConfig()
	conf.LocalID = raft.ServerID(*id)
	conf.LogOutput = os.Stderr
	conf.LogLevel = "WARN"
	tcpAddr, err := net.ResolveTCPAddr("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	trans, err := raft.NewTCPTransport(*addr, tcpAddr, 3, 2*time.Second, os.Stderr)
	if err != nil {
		log.Fatal(err)
	}
	store := raft.NewInmemStore()
	snaps := raft.NewInmemSnapshotStore()
	if *bootstrap {
		var servers []raft.Server
		for _, item := range strings.Split(*peers, ",") {
			parts := strings.SplitN(item, "=", 2)
			servers = append(servers, raft.Server{
				Suffrage: raft.Voter, ID: raft.ServerID(parts[0]), Address: raft.ServerAddress(parts[1]),
			})
		}
		if err := raft.BootstrapCluster(conf, store, store, snaps, trans,
			raft.Configuration{Servers: servers}); err != nil {
			log.Fatal(err)
		}
	}
	r, err := raft.NewRaft(conf, fsm{}, store, store, snaps, trans)
	if err != nil {
		log.Fatal(err)
	}
	http.HandleFunc("/status", func(w http.ResponseWriter, _ *http.Request) {
		term, _ := strconv.ParseUint(r.Stats()["term"], 10, 64)
		_ = json.NewEncoder(w).Encode(map[string]interface{}{
			"state": r.State().String(), "term": term, "leader": string(r.Leader()),
		})
	})
	http.HandleFunc("/apply", func(w http.ResponseWriter, _ *http.Request) {
		if err := r.Apply([]byte("x"), time.Second).Error(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	log.Fatal(http.ListenAndServe(*httpAddr, nil))
}
