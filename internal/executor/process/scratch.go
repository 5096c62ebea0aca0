package process

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
)

// removeAll is os.RemoveAll that also removes what a build made read-only, as Go's module
// cache under HOME is: on a permission error it makes every directory writable and retries.
func removeAll(path string) error {
	err := os.RemoveAll(path)
	if err == nil || !errors.Is(err, fs.ErrPermission) {
		return err
	}
	_ = filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			_ = os.Chmod(p, 0o700)
		}
		return nil
	})
	return os.RemoveAll(path)
}
