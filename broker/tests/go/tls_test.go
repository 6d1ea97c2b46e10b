package brokertests

// AMQPS through amqp091-go: a synod-broker of its own started with
// --tls-cert/--tls-key/--tls-ca (mutual TLS), certificates made in the test
// with crypto/x509. Skipped when AMQP_URL names an external broker.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

type testPKI struct {
	dir    string
	pool   *x509.CertPool
	caCert *x509.Certificate
	caKey  *ecdsa.PrivateKey
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err, "CA key")
	template := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "synod-go-ca"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	must(t, err, "CA certificate")
	cert, err := x509.ParseCertificate(der)
	must(t, err, "parse CA")
	p := &testPKI{dir: t.TempDir(), pool: x509.NewCertPool(), caCert: cert, caKey: key}
	p.pool.AddCert(cert)
	p.write(t, "ca.pem", "CERTIFICATE", der)
	return p
}

func (p *testPKI) write(t *testing.T, name, kind string, der []byte) string {
	t.Helper()
	path := filepath.Join(p.dir, name)
	must(t, os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600), "write "+name)
	return path
}

// leaf makes a CA-signed certificate; returns it as a tls.Certificate and writes it as name.pem/name.key.
func (p *testPKI) leaf(t *testing.T, name, commonName string, usage x509.ExtKeyUsage, serial int64) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err, "leaf key")
	template := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: commonName},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, p.caCert, &key.PublicKey, p.caKey)
	must(t, err, "leaf certificate")
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	must(t, err, "leaf key encoding")
	p.write(t, name+".pem", "CERTIFICATE", der)
	p.write(t, name+".key", "PRIVATE KEY", keyDER)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// startTLSBroker runs a synod-broker with mutual TLS; returns its AMQPS address.
func startTLSBroker(t *testing.T, p *testPKI) string {
	t.Helper()
	bin := os.Getenv("SYNOD_BROKER_BIN")
	if bin == "" {
		bin = filepath.Join("..", "..", "..", "target", "debug", "synod-broker")
	}
	ports := make([]int, 5)
	for i := range ports {
		port, err := freePort()
		must(t, err, "free port")
		ports[i] = port
	}
	dir := t.TempDir()
	logPath := filepath.Join(dir, "broker.log")
	logFile, err := os.Create(logPath)
	must(t, err, "log file")
	defer logFile.Close()
	amqps := fmt.Sprintf("127.0.0.1:%d", ports[1])
	cmd := exec.Command(bin,
		"--amqp-listen", fmt.Sprintf("127.0.0.1:%d", ports[0]),
		"--amqps-listen", amqps,
		"--mgmt-listen", fmt.Sprintf("127.0.0.1:%d", ports[2]),
		"--metrics-listen", fmt.Sprintf("127.0.0.1:%d", ports[3]),
		"--cluster-listen", fmt.Sprintf("127.0.0.1:%d", ports[4]),
		"--tls-cert", filepath.Join(p.dir, "server.pem"),
		"--tls-key", filepath.Join(p.dir, "server.key"),
		"--tls-ca", filepath.Join(p.dir, "ca.pem"),
		"--data-dir", filepath.Join(dir, "data"))
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	must(t, cmd.Start(), "start synod-broker")
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	err = waitListening(amqps, func() error {
		select {
		case err := <-exited:
			exited <- err
			out, _ := os.ReadFile(logPath)
			return fmt.Errorf("synod-broker exited (%v):\n%s", err, tail(string(out), 4000))
		default:
			return nil
		}
	})
	must(t, err, "AMQPS listener")
	return amqps
}

func TestAMQPSWithClientCertificates(t *testing.T) {
	// Goal: over mutual TLS, EXTERNAL logs in as the certificate's CN, PLAIN still works, and a client without certificate is refused.
	if os.Getenv("AMQP_URL") != "" {
		t.Skip("AMQP_URL names an external broker; TLS is tested against synod-broker only")
	}
	p := newTestPKI(t)
	p.leaf(t, "server", "localhost", x509.ExtKeyUsageServerAuth, 2)
	guest := p.leaf(t, "guest", "guest", x509.ExtKeyUsageClientAuth, 3)
	addr := startTLSBroker(t, p)
	config := func(certs ...tls.Certificate) *tls.Config {
		return &tls.Config{RootCAs: p.pool, ServerName: "localhost", Certificates: certs}
	}

	conn, err := amqp.DialTLS_ExternalAuth("amqps://"+addr+"/", config(guest))
	must(t, err, "EXTERNAL over AMQPS")
	ch := channel(t, conn)
	q := uniqueName(t, "tls")
	declareQueue(t, ch, q, nil)
	publishBody(t, ch, "", q, "by certificate")
	if got := getOne(t, ch, q, true); string(got.Body) != "by certificate" {
		t.Fatalf("got %q", got.Body)
	}
	conn.Close()

	conn, err = amqp.DialTLS("amqps://guest:guest@"+addr+"/", config(guest))
	must(t, err, "PLAIN over AMQPS")
	conn.Close()

	if conn, err := amqp.DialTLS("amqps://guest:guest@"+addr+"/", config()); err == nil {
		conn.Close()
		t.Fatal("a client without certificate was accepted")
	}
}
