// gocheck prints what Go's encoding/json produces for test inputs, so the Python hashing code can be
// compared byte for byte with the real thing. One JSON request per input line, one hex answer per line.
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
)

type identity struct {
	Model                string            `json:"model"`
	BackendFramework     string            `json:"backendFramework"`
	DynamoVersion        string            `json:"dynamoVersion,omitempty"`
	TensorParallelSize   int               `json:"tensorParallelSize"`
	PipelineParallelSize int               `json:"pipelineParallelSize"`
	Dtype                string            `json:"dtype,omitempty"`
	MaxModelLen          int               `json:"maxModelLen,omitempty"`
	ExtraParameters      map[string]string `json:"extraParameters,omitempty"`
}

type dgdID struct {
	Namespace     string `json:"namespace,omitempty"`
	DGDName       string `json:"dgdName"`
	DGDUID        string `json:"dgdUID,omitempty"`
	ComponentName string `json:"componentName"`
	WorkerHash    string `json:"workerHash,omitempty"`
}

type request struct {
	Kind     string          `json:"kind"` // "value" | "identity" | "dgd"
	Value    json.RawMessage `json:"value"`
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<24)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for in.Scan() {
		var req request
		if err := json.Unmarshal(in.Bytes(), &req); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		var encoded []byte
		var err error
		switch req.Kind {
		case "value":
			var v interface{}
			if err = json.Unmarshal(req.Value, &v); err == nil {
				encoded, err = json.Marshal(v)
			}
		case "identity":
			var id identity
			if err = json.Unmarshal(req.Value, &id); err == nil {
				if id.TensorParallelSize == 0 {
					id.TensorParallelSize = 1
				}
				if id.PipelineParallelSize == 0 {
					id.PipelineParallelSize = 1
				}
				encoded, err = json.Marshal(id)
			}
		case "dgd":
			var id dgdID
			if err = json.Unmarshal(req.Value, &id); err == nil {
				encoded, err = json.Marshal(id)
			}
		default:
			err = fmt.Errorf("unknown kind %q", req.Kind)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		sum := sha256.Sum256(encoded)
		fmt.Fprintf(out, "%s %s\n", hex.EncodeToString(encoded), hex.EncodeToString(sum[:]))
	}
}
