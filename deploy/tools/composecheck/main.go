// composecheck loads and validates a Compose file with compose-go, the library behind
// `docker compose config`, so CI can check docker-compose.yml on machines without Docker.
//
//	(cd deploy/tools/composecheck && go run . ../../../docker-compose.yml)
package main

import (
	"context"
	"fmt"
	"os"
	"sort"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	opts, err := cli.NewProjectOptions(os.Args[1:], cli.WithOsEnv, cli.WithDotEnv, cli.WithName("nbv"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, "invalid:", err)
		os.Exit(1)
	}
	names := make([]string, 0, len(project.Services))
	for name := range project.Services {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		fmt.Printf("service %s depends_on=%d\n", name, len(project.Services[name].DependsOn))
	}
	fmt.Println("valid")
}
