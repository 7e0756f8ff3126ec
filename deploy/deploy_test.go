// Package deploy_test checks the deployment artifacts in this directory
// against the service itself: the Dockerfile's build command is run and its
// binary started; compose and Kubernetes files are decoded strictly into
// typed structures and their environments loaded by the service's own
// config parser; every PromQL expression of the alerts and the dashboard is
// parsed by Prometheus's parser and every metric they name is scraped from
// a running instance.
package deploy_test

import (
	"bufio"
	"bytes"
	"debug/elf"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/huleedu/websocket-service/internal/config"
	"github.com/huleedu/websocket-service/internal/procgroup"
	"github.com/huleedu/websocket-service/internal/redistest"
)

const strongSecret = "deploy-test-secret-deploy-test-secret-0123"

// variables are the names of the README's configuration table: the
// service's own (config.Variables) and the Go runtime's (GOGC, GOMEMLIMIT)
// it documents there.
func variables() map[string]bool {
	out := map[string]bool{}
	for _, v := range config.Variables {
		out[v.Name] = true
	}
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		panic(err)
	}
	_, table, _ := strings.Cut(string(readme), "\n## Configuration\n")
	table, _, _ = strings.Cut(table, "\n## ")
	for _, m := range regexp.MustCompile("(?m)^\\| `([A-Z_]+)`").FindAllStringSubmatch(table, -1) {
		out[m[1]] = true
	}
	return out
}

func read(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ---- Dockerfile -------------------------------------------------------

type instruction struct{ cmd, args string }

// dockerfile reads instructions, joining continuation lines.
func dockerfile(t *testing.T) []instruction {
	var out []instruction
	var cur string
	sc := bufio.NewScanner(bytes.NewReader(read(t, "Dockerfile")))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.HasSuffix(line, "\\") {
			cur += strings.TrimSuffix(line, "\\") + " "
			continue
		}
		line = cur + line
		cur = ""
		cmd, args, _ := strings.Cut(line, " ")
		out = append(out, instruction{strings.ToUpper(cmd), strings.TrimSpace(args)})
	}
	return out
}

var (
	binOnce sync.Once
	binPath string
	binErr  error
	binDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// buildBinary runs the Dockerfile's `go build` line (its RUN instruction,
// with the output path moved to a temporary directory), once per run.
func buildBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		var run string
		for _, in := range dockerfile(t) {
			if in.cmd == "RUN" && strings.Contains(in.args, "go build") {
				run = in.args
			}
		}
		if run == "" {
			binErr = fmt.Errorf("no RUN ... go build in the Dockerfile")
			return
		}
		if binDir, binErr = os.MkdirTemp("", "deploy-test-"); binErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "websocket-service")
		run = strings.ReplaceAll(run, "${VERSION}", "deploy-test")
		run = strings.ReplaceAll(run, "/out/websocket-service", binPath)
		cmd := exec.Command("sh", "-c", run)
		cmd.Dir = ".." // the Dockerfile's WORKDIR holds the repository (COPY . .)
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("%s: %v\n%s", run, err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

func TestDockerfile(t *testing.T) {
	ins := dockerfile(t)
	var froms []string
	final := map[string][]string{} // instructions of the final stage
	for _, in := range ins {
		if in.cmd == "FROM" {
			froms = append(froms, in.args)
			final = map[string][]string{}
			continue
		}
		final[in.cmd] = append(final[in.cmd], in.args)
	}
	if len(froms) < 2 {
		t.Fatalf("want a multi-stage build, got FROM %v", froms)
	}
	// Base images: ARGs declared before the first FROM, pinned by digest or
	// marked UNPINNED with the pinning procedure beside them.
	args := map[string]string{}
	for _, in := range ins {
		if in.cmd == "FROM" {
			break
		}
		if in.cmd == "ARG" {
			k, v, _ := strings.Cut(in.args, "=")
			args[k] = v
		}
	}
	text := string(read(t, "Dockerfile"))
	for i, from := range froms {
		fields := strings.Fields(from)
		if i == 0 && fields[0] != "--platform=$BUILDPLATFORM" {
			t.Errorf("build stage FROM %s: want --platform=$BUILDPLATFORM (cross-compile, no emulation)", from)
		}
		if strings.HasPrefix(fields[0], "--platform") {
			fields = fields[1:]
		}
		image := fields[0]
		if strings.HasPrefix(image, "${") {
			image = args[strings.Trim(image, "${}")]
		}
		if !strings.Contains(image, "@sha256:") && !(strings.Contains(text, "UNPINNED") && strings.Contains(text, "imagetools inspect "+image)) {
			t.Errorf("FROM %s (%s): neither pinned by digest nor marked UNPINNED with its pinning command", from, image)
		}
		froms[i] = image
	}
	if last := froms[len(froms)-1]; !strings.HasPrefix(last, "scratch") && !strings.Contains(last, "distroless") {
		t.Errorf("final image %q: want scratch or distroless", last)
	}
	if u := final["USER"]; len(u) != 1 || strings.HasPrefix(u[0], "root") || strings.HasPrefix(u[0], "0") {
		t.Errorf("final stage USER %v: want one non-root user", u)
	}
	if !slices.Contains(final["EXPOSE"], "8080") {
		t.Errorf("EXPOSE %v: want 8080", final["EXPOSE"])
	}
	if !slices.Equal(final["STOPSIGNAL"], []string{"SIGTERM"}) {
		t.Errorf("STOPSIGNAL %v: want SIGTERM", final["STOPSIGNAL"])
	}
	if len(final["HEALTHCHECK"]) > 0 {
		t.Error("HEALTHCHECK in the image: orchestrators probe /healthz and /readyz")
	}
	if len(final["ENTRYPOINT"]) != 1 {
		t.Error("no ENTRYPOINT")
	}
	var build string
	for _, in := range ins {
		if in.cmd == "RUN" && strings.Contains(in.args, "go build") {
			build = in.args
		}
	}
	for _, want := range []string{"CGO_ENABLED=0", "GOOS=${TARGETOS}", "GOARCH=${TARGETARCH}", "-trimpath", "main.version=${VERSION}"} {
		if !strings.Contains(build, want) {
			t.Errorf("build line lacks %s: %s", want, build)
		}
	}
	if !strings.Contains(string(read(t, "../.dockerignore")), "node_modules") {
		t.Error(".dockerignore does not keep clients/js/node_modules out of the build context")
	}

	bin := buildBinary(t)
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Fatalf("binary is dynamically linked (program header %v)", p.Type)
		}
	}
	out, err := exec.Command(bin, "version").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "deploy-test") {
		t.Fatalf("version: %s %v (want the stamped version)", out, err)
	}

	t.Run("image", func(t *testing.T) {
		if err := exec.Command("docker", "version", "--format", "{{.Server.Version}}").Run(); err != nil {
			t.Skip("no Docker daemon here: the image was not built (the binary above is what its build stage produces)")
		}
		tag := "websocket-service:deploy-test"
		build := exec.Command("docker", "build", "-f", "deploy/Dockerfile", "-t", tag, ".")
		build.Dir = ".."
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("docker build: %v\n%s", err, out)
		}
		port, _ := redistest.FreePort()
		id, err := exec.Command("docker", "run", "-d", "--rm", "-p", fmt.Sprintf("127.0.0.1:%d:8080", port),
			"-e", "ENVIRONMENT=development", tag).Output()
		if err != nil {
			t.Fatal(err)
		}
		defer exec.Command("docker", "rm", "-f", strings.TrimSpace(string(id))).Run()
		waitStatus(t, fmt.Sprintf("http://127.0.0.1:%d/healthz", port), 200)
	})
}

// service is the built binary running against a real redis-server.
type service struct {
	url  string
	proc *procgroup.Group
	logs *bytes.Buffer
}

func startService(t *testing.T, env ...string) *service {
	t.Helper()
	bin := buildBinary(t)
	redis := redistest.Start(t)
	for attempt := 1; ; attempt++ {
		port, err := redistest.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, "serve")
		cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "WEBSOCKET_HOST=127.0.0.1", "WEBSOCKET_PORT=" + strconv.Itoa(port),
			"REDIS_URL=" + redis.URL(), "ENVIRONMENT=production", "JWT_SECRET_KEY=" + strongSecret, "SHUTDOWN_TIMEOUT=5s"}, env...)
		s := &service{url: "http://127.0.0.1:" + strconv.Itoa(port), logs: &bytes.Buffer{}}
		cmd.Stdout, cmd.Stderr = s.logs, s.logs
		if s.proc, err = procgroup.Start(cmd); err != nil {
			t.Fatal(err)
		}
		if waitUp(s) {
			t.Cleanup(func() { _ = s.proc.Kill() })
			return s
		}
		_ = s.proc.Kill()
		if attempt == 5 {
			t.Fatalf("service did not start")
		}
	}
}

// waitUp waits for /healthz, or for the process to exit (a taken port).
func waitUp(s *service) bool {
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: time.Second}
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-s.proc.Done():
			return false
		default:
		}
		if resp, err := c.Get(s.url + "/healthz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return true
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

func waitStatus(t *testing.T, url string, want int) {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := c.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == want {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not answer %d (%v)", url, want, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestBinaryServesAndDrainsOnSIGTERM(t *testing.T) {
	s := startService(t)
	waitStatus(t, s.url+"/readyz", 200)
	if err := s.proc.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.proc.Done():
		if code := s.proc.ExitCode(); code != 0 {
			t.Fatalf("exit code %d after SIGTERM\n%s", code, s.logs)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no exit within SHUTDOWN_TIMEOUT after SIGTERM")
	}
}

// TestSIGTERMFailsReadinessFirst: with SHUTDOWN_READINESS_DELAY, SIGTERM
// turns /readyz to 503 while the listener keeps answering (a load balancer
// health-checking /readyz sees the instance fail and stops routing to it),
// then the listener closes and the process exits 0 within SHUTDOWN_TIMEOUT.
func TestSIGTERMFailsReadinessFirst(t *testing.T) {
	s := startService(t, "SHUTDOWN_READINESS_DELAY=8s", "SHUTDOWN_TIMEOUT=60s")
	waitStatus(t, s.url+"/readyz", 200)
	if err := s.proc.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// Within the delay: 503 "draining" from the still-open listener.
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := c.Get(s.url + "/readyz")
		if err != nil {
			t.Fatalf("/readyz after SIGTERM: %v (the listener closed before readiness was seen failing)\n%s", err, s.logs)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 503 && strings.Contains(string(body), "draining") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz still %d after SIGTERM", resp.StatusCode)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Then the listener closes and the process exits cleanly.
	select {
	case <-s.proc.Done():
		if code := s.proc.ExitCode(); code != 0 {
			t.Fatalf("exit code %d after SIGTERM\n%s", code, s.logs)
		}
	case <-time.After(90 * time.Second):
		t.Fatal("no exit within SHUTDOWN_TIMEOUT after SIGTERM")
	}
	if !strings.Contains(s.logs.String(), "readiness_delay") {
		t.Errorf("no log line of the readiness delay:\n%s", s.logs)
	}
}

// ---- compose ----------------------------------------------------------

// interpolation matches a compose ${VAR...} reference.
var interpolation = regexp.MustCompile(`\$\{[A-Z_]+(:?[?-][^}]*)?\}`)

type composeFile struct {
	Name         string                    `json:"name"`
	XGateway     map[string]any            `json:"x-gateway"`
	XEnvironment map[string]any            `json:"x-environment"`
	Services     map[string]composeService `json:"services"`
	Volumes      map[string]any            `json:"volumes"`
	Networks     map[string]struct {
		IPAM struct {
			Config []struct {
				Subnet string `json:"subnet"`
			} `json:"config"`
		} `json:"ipam"`
	} `json:"networks"`
}

type composeService struct {
	Image           string                                `json:"image"`
	Build           *struct{ Context, Dockerfile string } `json:"build"`
	Command         []string                              `json:"command"`
	Restart         string                                `json:"restart"`
	StopSignal      string                                `json:"stop_signal"`
	StopGracePeriod string                                `json:"stop_grace_period"`
	ReadOnly        bool                                  `json:"read_only"`
	MemLimit        string                                `json:"mem_limit"`
	Volumes         []string                              `json:"volumes"`
	Ulimits         map[string]struct{ Soft, Hard int }   `json:"ulimits"`
	Healthcheck     *struct{ Disable bool }               `json:"healthcheck"`
	Ports           []string                              `json:"ports"`
	Environment     map[string]string                     `json:"environment"`
	Profiles        []string                              `json:"profiles"`
	DependsOn       json.RawMessage                       `json:"depends_on"`
	Networks        json.RawMessage                       `json:"networks"`
}

// strict decodes YAML into v, refusing fields v does not have.
func strict(t *testing.T, data []byte, v any) {
	t.Helper()
	j, err := yaml.YAMLToJSON(data)
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Fatalf("strict decode into %T: %v", v, err)
	}
}

// loadEnv runs the service's config parser on env (as the container sees it).
func loadEnv(t *testing.T, where string, env map[string]string) config.Config {
	t.Helper()
	vars := variables()
	for k := range env {
		if !vars[k] {
			t.Errorf("%s sets %s, which is not in the configuration table", where, k)
		}
	}
	c, err := config.Load(func(k string) string { return env[k] })
	if err != nil {
		t.Fatalf("%s: the service would refuse to start: %v", where, err)
	}
	if !c.Production() {
		t.Errorf("%s: ENVIRONMENT is not production", where)
	}
	return c
}

func TestCompose(t *testing.T) {
	raw := read(t, "compose.yaml")
	var f composeFile
	strict(t, raw, &f)
	for name := range variables() {
		if !bytes.Contains(raw, []byte(name+":")) {
			t.Errorf("compose.yaml does not list %s (set or as a commented default)", name)
		}
	}
	gateways := 0
	for name, svc := range f.Services {
		if svc.Build == nil {
			continue
		}
		gateways++
		if svc.Build.Dockerfile != "deploy/Dockerfile" || svc.Build.Context != ".." {
			t.Errorf("%s builds %s in %s", name, svc.Build.Dockerfile, svc.Build.Context)
		}
		if len(svc.Ports) != 1 || !strings.HasSuffix(svc.Ports[0], ":8080") {
			t.Errorf("%s ports %v: want one mapping to 8080", name, svc.Ports)
		}
		env := map[string]string{}
		for k, v := range svc.Environment {
			// ${VAR:?message}: compose refuses to start without it; the test sets it.
			env[k] = interpolation.ReplaceAllString(v, strongSecret)
		}
		c := loadEnv(t, "compose service "+name, env)
		grace, err := time.ParseDuration(svc.StopGracePeriod)
		if err != nil || grace <= c.ShutdownTimeout {
			t.Errorf("%s: stop_grace_period %q must exceed SHUTDOWN_TIMEOUT %s", name, svc.StopGracePeriod, c.ShutdownTimeout)
		}
		checkGOMEMLIMIT(t, "compose service "+name, svc.Environment["GOMEMLIMIT"], composeBytes(t, svc.MemLimit), c.MaxConns)
		if svc.StopSignal != "SIGTERM" || !svc.ReadOnly || svc.Ulimits["nofile"].Soft < 65536 {
			t.Errorf("%s: stop_signal %q, read_only %v, nofile %d", name, svc.StopSignal, svc.ReadOnly, svc.Ulimits["nofile"].Soft)
		}
	}
	if !bytes.Contains(raw, []byte("Needs Docker Compose v2")) {
		t.Error("compose.yaml does not say it needs Compose v2")
	}
	var nodes []string // addresses of the cluster profile's Redis nodes
	for name, svc := range f.Services {
		if svc.Restart == "" {
			t.Errorf("%s has no restart policy", name)
		}
		if len(svc.Command) == 0 || svc.Command[0] != "redis-server" {
			continue
		}
		// Persistence: the history survives a restart (README, retention).
		cmd := strings.Join(svc.Command, " ")
		if !strings.Contains(cmd, "--appendonly yes") || !slices.ContainsFunc(svc.Volumes, func(v string) bool { return strings.HasSuffix(v, ":/data") }) {
			t.Errorf("%s: %q with volumes %v: want AOF (--appendonly yes) on a volume at /data", name, cmd, svc.Volumes)
		}
		if strings.HasPrefix(name, "redis-node-") {
			var n struct {
				Cluster struct {
					IPv4 string `json:"ipv4_address"`
				} `json:"cluster"`
			}
			if err := json.Unmarshal(svc.Networks, &n); err != nil {
				t.Fatal(err)
			}
			nodes = append(nodes, n.Cluster.IPv4)
		}
	}
	if create := strings.Join(f.Services["redis-cluster-create"].Command, " "); len(nodes) != 6 {
		t.Errorf("%d cluster nodes, want 6", len(nodes))
	} else {
		wait, _, _ := strings.Cut(create, "cluster info")
		for _, ip := range nodes {
			if !strings.Contains(wait, ip) {
				t.Errorf("redis-cluster-create does not wait for %s before creating the cluster", ip)
			}
		}
	}
	if gateways != 4 {
		t.Errorf("%d gateway services, want 4 (one default, three in the cluster profile)", gateways)
	}
	if got := f.Services["websocket-service"].Ports; !slices.Equal(got, []string{"8081:8080"}) {
		t.Errorf("websocket-service ports %v, want 8081:8080 like the service it replaces", got)
	}
}

// composeBytes parses a compose byte value (512m, 1g, 1048576b).
func composeBytes(t *testing.T, v string) int64 {
	t.Helper()
	m := regexp.MustCompile(`^([0-9]+)([bkmg]?)$`).FindStringSubmatch(strings.ToLower(v))
	if m == nil {
		t.Errorf("mem_limit %q: want a byte value such as 512m", v)
		return 0
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	return n << map[string]int{"": 0, "b": 0, "k": 10, "m": 20, "g": 30}[m[2]]
}

// ---- Kubernetes -------------------------------------------------------

type kustomization struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Labels     []struct {
		Pairs            map[string]string `json:"pairs"`
		IncludeSelectors bool              `json:"includeSelectors"`
	} `json:"labels"`
	Resources []string `json:"resources"`
	Images    []struct {
		Name    string `json:"name"`
		NewName string `json:"newName"`
		NewTag  string `json:"newTag"`
		Digest  string `json:"digest"`
	} `json:"images"`
	ConfigMapGenerator []generator `json:"configMapGenerator"`
	SecretGenerator    []generator `json:"secretGenerator"`
}

type generator struct {
	Name string   `json:"name"`
	Envs []string `json:"envs"`
}

// Sizing figures (docs/operations.md, "Sizing the pods"): per connection,
// RSS (GOGC=25, rounded up from the measured 1.65-2.3 KiB) and the kernel's
// socket memory, which cgroup v2 charges to the container; and the
// process's base.
const (
	rssPerConn    = 2.5 * 1024
	kernelPerConn = 3 * 1024
	baseRSS       = 32 << 20
)

func TestKubernetes(t *testing.T) {
	var k kustomization
	strict(t, read(t, "k8s/kustomization.yaml"), &k)
	var (
		dep *appsv1.Deployment
		svc *corev1.Service
		pdb *policyv1.PodDisruptionBudget
		hpa *autoscalingv2.HorizontalPodAutoscaler
	)
	for _, res := range k.Resources {
		data := read(t, filepath.Join("k8s", res))
		var meta struct{ Kind string }
		if err := yaml.Unmarshal(data, &meta); err != nil {
			t.Fatal(err)
		}
		var obj any
		switch meta.Kind {
		case "Deployment":
			dep = &appsv1.Deployment{}
			obj = dep
		case "Service":
			svc = &corev1.Service{}
			obj = svc
		case "PodDisruptionBudget":
			pdb = &policyv1.PodDisruptionBudget{}
			obj = pdb
		case "HorizontalPodAutoscaler":
			hpa = &autoscalingv2.HorizontalPodAutoscaler{}
			obj = hpa
		default:
			t.Fatalf("%s: unexpected kind %q", res, meta.Kind)
		}
		if err := yaml.UnmarshalStrict(data, obj); err != nil {
			t.Fatalf("%s: %v", res, err)
		}
	}
	if dep == nil || svc == nil || pdb == nil || hpa == nil {
		t.Fatal("kustomization lacks a Deployment, Service, PodDisruptionBudget or HorizontalPodAutoscaler")
	}

	// The image: a registry and a tag of the operator's, never a bare
	// local name (ImagePullBackOff) or latest.
	var image *struct{ Name, NewName, NewTag, Digest string }
	for i := range k.Images {
		if k.Images[i].Name == "websocket-service" {
			im := k.Images[i]
			image = &struct{ Name, NewName, NewTag, Digest string }{im.Name, im.NewName, im.NewTag, im.Digest}
		}
	}
	if image == nil {
		t.Error("kustomization has no images: entry for websocket-service: the pods would pull websocket-service from Docker Hub")
	} else if host, _, ok := strings.Cut(image.NewName, "/"); !ok || !strings.ContainsAny(host, ".:") || (image.NewTag == "" && image.Digest == "") || image.NewTag == "latest" {
		t.Errorf("images: %+v: want newName with a registry host and a pinned tag or digest", *image)
	}
	if !strings.Contains(string(read(t, "../docs/operations.md")), "kustomize edit set image websocket-service=") {
		t.Error("docs/operations.md does not say how to set the image")
	}

	// The Secret: generated from secret.env (git-ignored; the apply fails
	// loudly without it), whose example names every key the pods read.
	secrets := map[string]bool{}
	for _, g := range k.SecretGenerator {
		secrets[g.Name] = true
		for _, f := range g.Envs {
			if !strings.Contains(string(read(t, "../.gitignore")), "/deploy/k8s/"+f) {
				t.Errorf("%s is not git-ignored", f)
			}
			read(t, filepath.Join("k8s", f+".example"))
		}
	}

	// Placeholders an operator must change are marked.
	cm := string(read(t, "k8s/configmap.env"))
	for _, key := range []string{"REDIS_URL", "CORS_ORIGINS"} {
		before, _, _ := strings.Cut(cm, "\n"+key+"=")
		lines := strings.Split(before, "\n")
		for len(lines) > 0 && strings.HasPrefix(lines[len(lines)-1], "# ") && !strings.HasPrefix(lines[len(lines)-1], "# PLACEHOLDER") {
			lines = lines[:len(lines)-1]
		}
		if len(lines) == 0 || !strings.HasPrefix(lines[len(lines)-1], "# PLACEHOLDER") {
			t.Errorf("configmap.env: %s is not called out as a PLACEHOLDER", key)
		}
	}

	// The environment: the generated ConfigMap plus the Secret's key.
	env := map[string]string{}
	for _, g := range k.ConfigMapGenerator {
		for _, file := range g.Envs {
			for _, line := range strings.Split(string(read(t, filepath.Join("k8s", file))), "\n") {
				if key, val, ok := strings.Cut(strings.TrimSpace(line), "="); ok && !strings.HasPrefix(key, "#") {
					env[key] = val
				}
			}
		}
	}
	pod := dep.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers", len(pod.Containers))
	}
	c := pod.Containers[0]
	for _, e := range c.Env {
		if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
			ref := e.ValueFrom.SecretKeyRef
			if !secrets[ref.Name] {
				t.Errorf("env %s reads Secret %q, which the kustomization does not generate: pods would sit in CreateContainerConfigError", e.Name, ref.Name)
			}
			for _, g := range k.SecretGenerator {
				if g.Name == ref.Name && !strings.Contains(string(read(t, filepath.Join("k8s", g.Envs[0]+".example"))), "\n"+ref.Key+"=") {
					t.Errorf("%s.example lacks %s", g.Envs[0], ref.Key)
				}
			}
			env[e.Name] = strongSecret
		} else {
			env[e.Name] = e.Value
		}
	}
	if len(c.EnvFrom) != 1 || c.EnvFrom[0].ConfigMapRef == nil || c.EnvFrom[0].ConfigMapRef.Name != k.ConfigMapGenerator[0].Name {
		t.Errorf("container envFrom %+v does not use the generated ConfigMap", c.EnvFrom)
	}
	cfg := loadEnv(t, "the Deployment", env)

	// Replicas belong to the HPA; a rollout waits for connections to settle.
	if dep.Spec.Replicas != nil {
		t.Errorf("Deployment sets replicas: %d beside an HPA: every apply resets the count and drops the clients of removed pods", *dep.Spec.Replicas)
	}
	if dep.Spec.MinReadySeconds < 10 {
		t.Errorf("minReadySeconds %d: a rollout would not let connections settle between pods", dep.Spec.MinReadySeconds)
	}
	if p := c.ReadinessProbe; p != nil && (p.FailureThreshold < 2 || p.TimeoutSeconds < 2) {
		t.Errorf("readiness probe fails on one slow answer (failureThreshold %d, timeoutSeconds %d)", p.FailureThreshold, p.TimeoutSeconds)
	}

	// Memory: requested for WEBSOCKET_MAX_CONNECTIONS, GOMEMLIMIT derived
	// from the limit, and no HPA memory target that scales out (and never
	// back in) before a pod holds its planned connections.
	if cfg.MaxConns == 0 {
		t.Fatal("WEBSOCKET_MAX_CONNECTIONS unset: the pods cannot be sized")
	}
	need := float64(cfg.MaxConns)*(rssPerConn+kernelPerConn) + baseRSS
	request, limit := c.Resources.Requests.Memory().Value(), c.Resources.Limits.Memory().Value()
	if float64(request) < need || request > limit {
		t.Errorf("memory request %d B for %d connections: want %.0f B (%.1f KiB each + base) to the limit %d B", request, cfg.MaxConns, need, (rssPerConn+kernelPerConn)/1024, limit)
	}
	checkGOMEMLIMIT(t, "the Deployment", env["GOMEMLIMIT"], limit, cfg.MaxConns)
	for _, m := range hpa.Spec.Metrics {
		if m.Resource == nil || m.Resource.Name != corev1.ResourceMemory || m.Resource.Target.AverageUtilization == nil {
			continue
		}
		at := float64(*m.Resource.Target.AverageUtilization) / 100 * float64(request)
		if conns := (at - baseRSS) / (rssPerConn + kernelPerConn); conns < float64(cfg.MaxConns) {
			t.Errorf("HPA memory target %d%% of %d B scales out at ~%.0f connections per pod, below WEBSOCKET_MAX_CONNECTIONS %d (and memory does not fall after a scale-out)",
				*m.Resource.Target.AverageUtilization, request, conns, cfg.MaxConns)
		}
	}

	if len(c.Ports) != 1 || c.Ports[0].ContainerPort != 8080 || c.Ports[0].Name != "http" {
		t.Errorf("container ports %+v: want http 8080", c.Ports)
	}
	if p := c.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/readyz" || p.HTTPGet.Port.String() != "http" {
		t.Errorf("readiness probe %+v: want GET /readyz on http", p)
	}
	if p := c.LivenessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz" {
		t.Errorf("liveness probe %+v: want GET /healthz", p)
	}
	var preStop time.Duration
	if l := c.Lifecycle; l != nil && l.PreStop != nil && l.PreStop.Sleep != nil {
		preStop = time.Duration(l.PreStop.Sleep.Seconds) * time.Second
	}
	if preStop <= 0 {
		t.Error("no preStop sleep: the load balancer would still route to a draining pod")
	}
	grace := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second
	if grace <= preStop+cfg.ShutdownTimeout {
		t.Errorf("terminationGracePeriodSeconds %s <= preStop %s + SHUTDOWN_TIMEOUT %s: the kubelet would kill the drain", grace, preStop, cfg.ShutdownTimeout)
	}
	sc := c.SecurityContext
	if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("container securityContext %+v: want a read-only root and no privilege escalation", sc)
	}
	if psc := pod.SecurityContext; psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
		t.Error("pod does not require a non-root user")
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Errorf("resources %+v: want cpu and memory requests and a memory limit", c.Resources)
	}
	ann := dep.Spec.Template.Annotations
	if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != "8080" || ann["prometheus.io/path"] != "/metrics" {
		t.Errorf("scrape annotations %v", ann)
	}
	labels := dep.Spec.Template.Labels
	for what, sel := range map[string]map[string]string{"Deployment": dep.Spec.Selector.MatchLabels, "Service": svc.Spec.Selector,
		"PodDisruptionBudget": pdb.Spec.Selector.MatchLabels} {
		for k, v := range sel {
			if labels[k] != v {
				t.Errorf("%s selects %s=%s, which the pods do not carry", what, k, v)
			}
		}
	}
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].TargetPort.String() != "http" {
		t.Errorf("Service ports %+v: want targetPort http", svc.Spec.Ports)
	}
	if hpa.Spec.ScaleTargetRef.Kind != "Deployment" || hpa.Spec.ScaleTargetRef.Name != dep.Name || *hpa.Spec.MinReplicas < 2 {
		t.Errorf("HPA targets %+v (min %d)", hpa.Spec.ScaleTargetRef, *hpa.Spec.MinReplicas)
	}
	if pdb.Spec.MaxUnavailable == nil {
		t.Error("PodDisruptionBudget without maxUnavailable")
	}
}

// checkGOMEMLIMIT: Go's soft limit leaves the kernel's socket memory and
// a margin under the container's limit, and the live heap room.
func checkGOMEMLIMIT(t *testing.T, where, v string, limit int64, maxConns int) {
	t.Helper()
	units := map[string]float64{"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
	m := regexp.MustCompile(`^([0-9]+)(B|KiB|MiB|GiB)$`).FindStringSubmatch(v)
	if m == nil {
		t.Errorf("%s: GOMEMLIMIT %q: want a size such as 300MiB derived from the memory limit", where, v)
		return
	}
	n, _ := strconv.ParseFloat(m[1], 64)
	got := n * units[m[2]]
	hi := 0.9*float64(limit) - float64(maxConns)*kernelPerConn
	lo := float64(maxConns)*rssPerConn + baseRSS
	if got > hi || got < lo {
		t.Errorf("%s: GOMEMLIMIT %s: want %.0f-%.0f MiB (0.9 x limit %d MiB - kernel socket memory of %d connections; at least their RSS)",
			where, v, lo/(1<<20), hi/(1<<20), limit>>20, maxConns)
	}
}

// TestPrometheusOperator: the PodMonitor scrapes the pods as the alerts
// expect (job="websocket-service", port http, /metrics), and the
// PrometheusRule carries exactly the rules of alerts.yaml.
func TestPrometheusOperator(t *testing.T) {
	var k struct {
		APIVersion string   `json:"apiVersion"`
		Kind       string   `json:"kind"`
		Resources  []string `json:"resources"`
	}
	strict(t, read(t, "k8s/monitoring/kustomization.yaml"), &k)
	var pm struct {
		APIVersion string            `json:"apiVersion"`
		Kind       string            `json:"kind"`
		Metadata   metav1.ObjectMeta `json:"metadata"`
		Spec       struct {
			JobLabel            string               `json:"jobLabel"`
			Selector            metav1.LabelSelector `json:"selector"`
			PodMetricsEndpoints []struct {
				Port     string `json:"port"`
				Path     string `json:"path"`
				Interval string `json:"interval"`
			} `json:"podMetricsEndpoints"`
		} `json:"spec"`
	}
	var pr struct {
		APIVersion string            `json:"apiVersion"`
		Kind       string            `json:"kind"`
		Metadata   metav1.ObjectMeta `json:"metadata"`
		Spec       json.RawMessage   `json:"spec"`
	}
	if !slices.Equal(k.Resources, []string{"podmonitor.yaml", "prometheusrule.yaml"}) {
		t.Fatalf("monitoring resources %v", k.Resources)
	}
	strict(t, read(t, "k8s/monitoring/podmonitor.yaml"), &pm)
	strict(t, read(t, "k8s/monitoring/prometheusrule.yaml"), &pr)
	if pm.Kind != "PodMonitor" || pm.APIVersion != "monitoring.coreos.com/v1" || pr.Kind != "PrometheusRule" || pr.APIVersion != "monitoring.coreos.com/v1" {
		t.Fatalf("kinds %s %s, %s %s", pm.APIVersion, pm.Kind, pr.APIVersion, pr.Kind)
	}
	var dep appsv1.Deployment
	if err := yaml.Unmarshal(read(t, "k8s/deployment.yaml"), &dep); err != nil {
		t.Fatal(err)
	}
	pod := dep.Spec.Template.Labels
	for key, v := range pm.Spec.Selector.MatchLabels {
		if pod[key] != v {
			t.Errorf("PodMonitor selects %s=%s, which the pods do not carry", key, v)
		}
	}
	if pod[pm.Spec.JobLabel] != "websocket-service" {
		t.Errorf("PodMonitor jobLabel %q: the job would not be websocket-service, which the alerts on up select", pm.Spec.JobLabel)
	}
	if e := pm.Spec.PodMetricsEndpoints; len(e) != 1 || e[0].Port != "http" || e[0].Path != "/metrics" {
		t.Errorf("PodMonitor endpoints %+v: want port http, path /metrics", e)
	}
	var rulesFile, ruleSpec any
	if err := yaml.Unmarshal(read(t, "prometheus/alerts.yaml"), &rulesFile); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(pr.Spec, &ruleSpec); err != nil {
		t.Fatal(err)
	}
	a, _ := json.Marshal(rulesFile)
	b, _ := json.Marshal(ruleSpec)
	if !bytes.Equal(a, b) {
		t.Error("k8s/monitoring/prometheusrule.yaml's spec differs from prometheus/alerts.yaml: regenerate it (its header)")
	}
}

// ---- alerts and dashboard ---------------------------------------------

var promParser = parser.NewParser(parser.Options{})

// metricNames returns the metric names an expression selects.
func metricNames(t *testing.T, where, expr string) []string {
	t.Helper()
	e, err := promParser.ParseExpr(expr)
	if err != nil {
		t.Errorf("%s: %v\n%s", where, err, expr)
		return nil
	}
	var names []string
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			names = append(names, vs.Name)
		}
		return nil
	})
	if len(names) == 0 {
		t.Errorf("%s selects no metric: %s", where, expr)
	}
	return names
}

// exported scrapes a running instance's /metrics: the family names, plus
// the _bucket/_sum/_count series of histograms and summaries.
func exported(t *testing.T) map[string]bool {
	s := startService(t)
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(s.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	out := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^# TYPE (\S+) (\S+)$`).FindAllStringSubmatch(string(body), -1) {
		out[m[1]] = true
		if m[2] == "histogram" || m[2] == "summary" {
			out[m[1]+"_bucket"], out[m[1]+"_sum"], out[m[1]+"_count"] = true, true, true
		}
	}
	return out
}

func TestAlertsAndDashboardUseExportedMetrics(t *testing.T) {
	have := exported(t)
	if !have["websocket_connections_active"] {
		t.Fatal("scrape found no websocket metrics")
	}
	used := map[string][]string{} // metric → where

	groups, errs := rulefmt.Parse(read(t, "prometheus/alerts.yaml"), false, model.UTF8Validation, promParser, slog.New(slog.DiscardHandler))
	for _, err := range errs {
		t.Errorf("alerts.yaml: %v", err)
	}
	if groups == nil {
		t.FailNow()
	}
	alerts := 0
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			alerts++
			for _, n := range metricNames(t, "alert "+r.Alert, r.Expr) {
				used[n] = append(used[n], "alert "+r.Alert)
			}
		}
	}
	for _, needed := range []string{"WebsocketRedisLinkDown", "WebsocketDegradedSessions", "WebsocketSlowConsumerCloses", "WebsocketRateLimitCloses",
		"WebsocketDeliveryLatencyHigh", "WebsocketConnectionsNearLimit", "WebsocketHandshakeFailures"} {
		if !strings.Contains(string(read(t, "prometheus/alerts.yaml")), "alert: "+needed+"\n") {
			t.Errorf("no alert %s", needed)
		}
	}

	var dash struct {
		Title  string `json:"title"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name  string `json:"name"`
				Query any    `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(read(t, "grafana/websocket-service.json"), &dash); err != nil {
		t.Fatal(err)
	}
	grafanaVars := strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m", `"$instance"`, `".*"`, `"$job"`, `".*"`, `"$namespace"`, `".*"`)
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			for _, n := range metricNames(t, "panel "+p.Title, grafanaVars.Replace(tg.Expr)) {
				used[n] = append(used[n], "panel "+p.Title)
			}
		}
	}
	for _, want := range []string{"websocket_connections_active", "websocket_connections_closed_total", "websocket_messages_delivered_total",
		"websocket_delivery_latency_seconds_bucket", "websocket_messages_dropped_total", "websocket_redis_link_up",
		"process_resident_memory_bytes", "go_goroutines"} {
		if len(used[want]) == 0 || !slices.ContainsFunc(used[want], func(w string) bool { return strings.HasPrefix(w, "panel") }) {
			t.Errorf("the dashboard shows nothing of %s", want)
		}
	}
	have["up"] = true // written by Prometheus for every scrape, not by the service
	for name, where := range used {
		if !have[name] {
			t.Errorf("%s (used by %s) is not exported by a running instance", name, strings.Join(where, ", "))
		}
	}
	t.Logf("%d alerts and %d panels use %d metrics, all exported", alerts, len(dash.Panels), len(used))
}
