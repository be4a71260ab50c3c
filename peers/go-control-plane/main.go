// Command go-control-plane serves, through envoyproxy/go-control-plane's
// own caches and ADS server, the clusters and load assignments that
// meshreg-load generates for meshreg, so both are measured with the same
// proxy fleet and the same changes (meshreg-load compare).
//
// The resources match meshreg's for the same service field for field:
// cluster "outbound|8080||svc-<i>.load.svc.cluster.local" (EDS over ADS,
// connect timeout 10 s) and its ClusterLoadAssignment with <endpoints>
// endpoints 10.0.0.0 + 256*i + j + 1 port 8080, HEALTHY, the first carrying
// the change stamp as its load-balancing weight (no weight when 0).
//
// Flags: -addr (listen address, default 127.0.0.1:0), -services,
// -endpoints, -cache linear|snapshot. linear is one LinearCache per type
// behind a MuxCache (per-resource versions, delta-native); snapshot is the
// SnapshotCache with one snapshot shared by every node (a constant node
// hash), rebuilt on each change as its users do.
//
// Protocol: the first line on stdout is "listening <addr>". Then one JSON
// command per line on stdin, each answered "ok" (or "error: ...") once the
// cache holds it:
//
//	{"op":"stamp","service":3,"stamp":17}   first endpoint's weight := 17
//	{"op":"add","service":1000}             a new service (stamp 0)
//	{"op":"remove","service":1000}          remove its cluster and assignment
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cache "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	server "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

type command struct {
	Op      string `json:"op"`
	Service int    `json:"service"`
	Stamp   uint32 `json:"stamp"`
}

func hostname(i int) string { return fmt.Sprintf("svc-%d.load.svc.cluster.local", i) }

func clusterName(i int) string { return "outbound|8080||" + hostname(i) }

func makeCluster(i int) *cluster.Cluster {
	name := clusterName(i)
	return &cluster.Cluster{
		Name:                 name,
		ConnectTimeout:       durationpb.New(10 * time.Second),
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_EDS},
		EdsClusterConfig: &cluster.Cluster_EdsClusterConfig{
			EdsConfig: &core.ConfigSource{
				ResourceApiVersion:    core.ApiVersion_V3,
				ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
			},
			ServiceName: name,
		},
	}
}

func makeAssignment(i, endpoints int, stamp uint32) *endpoint.ClusterLoadAssignment {
	lbs := make([]*endpoint.LbEndpoint, endpoints)
	for j := range lbs {
		ip := uint32(10)<<24 + uint32(i)*256 + uint32(j) + 1
		addr := net.IPv4(byte(ip>>24), byte(ip>>16), byte(ip>>8), byte(ip)).String()
		lb := &endpoint.LbEndpoint{
			HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
				Address: &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
					Address:       addr,
					PortSpecifier: &core.SocketAddress_PortValue{PortValue: 8080},
				}}},
			}},
			HealthStatus: core.HealthStatus_HEALTHY,
		}
		if j == 0 && stamp > 0 {
			lb.LoadBalancingWeight = wrapperspb.UInt32(stamp)
		}
		lbs[j] = lb
	}
	total := uint32(endpoints)
	if endpoints > 0 && stamp > 1 {
		total += stamp - 1
	}
	return &endpoint.ClusterLoadAssignment{
		ClusterName: clusterName(i),
		Endpoints: []*endpoint.LocalityLbEndpoints{{
			LbEndpoints:         lbs,
			LoadBalancingWeight: wrapperspb.UInt32(total),
		}},
	}
}

// store applies changes to one of go-control-plane's caches.
type store interface {
	cache.Cache
	set(i int, c *cluster.Cluster, a *endpoint.ClusterLoadAssignment) error
	setAssignment(i int, a *endpoint.ClusterLoadAssignment) error
	remove(i int) error
}

// linear: one LinearCache per type, behind a MuxCache.
type linear struct {
	*cache.MuxCache
	clusters, assignments *cache.LinearCache
}

func newLinear(clusters, assignments map[string]types.Resource) *linear {
	l := &linear{
		clusters:    cache.NewLinearCache(resource.ClusterType, cache.WithInitialResources(clusters)),
		assignments: cache.NewLinearCache(resource.EndpointType, cache.WithInitialResources(assignments)),
	}
	l.MuxCache = &cache.MuxCache{
		Classify:      func(r *cache.Request) string { return r.GetTypeUrl() },
		ClassifyDelta: func(r *cache.DeltaRequest) string { return r.GetTypeUrl() },
		Caches: map[string]cache.Cache{
			resource.ClusterType:  l.clusters,
			resource.EndpointType: l.assignments,
		},
	}
	return l
}

func (l *linear) set(i int, c *cluster.Cluster, a *endpoint.ClusterLoadAssignment) error {
	if err := l.assignments.UpdateResource(clusterName(i), a); err != nil {
		return err
	}
	return l.clusters.UpdateResource(clusterName(i), c)
}

func (l *linear) setAssignment(i int, a *endpoint.ClusterLoadAssignment) error {
	return l.assignments.UpdateResource(clusterName(i), a)
}

func (l *linear) remove(i int) error {
	if err := l.clusters.DeleteResource(clusterName(i)); err != nil {
		return err
	}
	return l.assignments.DeleteResource(clusterName(i))
}

// snapshot: the SnapshotCache, one snapshot for every node.
type snapshot struct {
	cache.SnapshotCache
	version     int
	clusters    map[string]types.Resource
	assignments map[string]types.Resource
}

// allNodes gives every node the same snapshot.
type allNodes struct{}

func (allNodes) ID(*core.Node) string { return "all" }

func newSnapshot(clusters, assignments map[string]types.Resource) (*snapshot, error) {
	s := &snapshot{
		SnapshotCache: cache.NewSnapshotCache(true, allNodes{}, nil),
		clusters:      clusters,
		assignments:   assignments,
	}
	return s, s.publish()
}

func (s *snapshot) publish() error {
	s.version++
	list := func(m map[string]types.Resource) []types.Resource {
		out := make([]types.Resource, 0, len(m))
		for _, r := range m {
			out = append(out, r)
		}
		return out
	}
	snap, err := cache.NewSnapshot(strconv.Itoa(s.version), map[resource.Type][]types.Resource{
		resource.ClusterType:  list(s.clusters),
		resource.EndpointType: list(s.assignments),
	})
	if err != nil {
		return err
	}
	return s.SetSnapshot(context.Background(), "all", snap)
}

func (s *snapshot) set(i int, c *cluster.Cluster, a *endpoint.ClusterLoadAssignment) error {
	s.clusters[clusterName(i)] = c
	s.assignments[clusterName(i)] = a
	return s.publish()
}

func (s *snapshot) setAssignment(i int, a *endpoint.ClusterLoadAssignment) error {
	s.assignments[clusterName(i)] = a
	return s.publish()
}

func (s *snapshot) remove(i int) error {
	delete(s.clusters, clusterName(i))
	delete(s.assignments, clusterName(i))
	return s.publish()
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	services := flag.Int("services", 1000, "services at start")
	endpoints := flag.Int("endpoints", 10, "endpoints per service")
	kind := flag.String("cache", "linear", "linear or snapshot")
	flag.Parse()
	if err := run(*addr, *services, *endpoints, *kind); err != nil {
		fmt.Fprintln(os.Stderr, "go-control-plane:", err)
		os.Exit(1)
	}
}

func run(addr string, services, endpoints int, kind string) error {
	clusters := make(map[string]types.Resource, services)
	assignments := make(map[string]types.Resource, services)
	for i := 0; i < services; i++ {
		clusters[clusterName(i)] = makeCluster(i)
		assignments[clusterName(i)] = makeAssignment(i, endpoints, 0)
	}
	var st store
	switch kind {
	case "linear":
		st = newLinear(clusters, assignments)
	case "snapshot":
		s, err := newSnapshot(clusters, assignments)
		if err != nil {
			return err
		}
		st = s
	default:
		return fmt.Errorf("-cache %q: want linear or snapshot", kind)
	}

	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	grpcServer := grpc.NewServer(grpc.MaxConcurrentStreams(1 << 20))
	discovery.RegisterAggregatedDiscoveryServiceServer(grpcServer,
		server.NewServer(context.Background(), st, nil))
	go func() { _ = grpcServer.Serve(lis) }()
	fmt.Printf("listening %s\n", lis.Addr())

	in := bufio.NewScanner(os.Stdin)
	out := bufio.NewWriter(os.Stdout)
	for in.Scan() {
		var cmd command
		err := json.Unmarshal(in.Bytes(), &cmd)
		if err == nil {
			switch cmd.Op {
			case "stamp":
				err = st.setAssignment(cmd.Service, makeAssignment(cmd.Service, endpoints, cmd.Stamp))
			case "add":
				err = st.set(cmd.Service, makeCluster(cmd.Service), makeAssignment(cmd.Service, endpoints, 0))
			case "remove":
				err = st.remove(cmd.Service)
			case "exit":
				return nil
			default:
				err = fmt.Errorf("unknown op %q", cmd.Op)
			}
		}
		if err != nil {
			fmt.Fprintf(out, "error: %v\n", err)
		} else {
			fmt.Fprintln(out, "ok")
		}
		out.Flush()
	}
	return in.Err()
}
