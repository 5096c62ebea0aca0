package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"sigs.k8s.io/yaml"
)

// locate turns a decoding error of the targets file into one that names the field by its
// path (targets[1].timeout.max). encoding/json, which sigs.k8s.io/yaml decodes with, names
// an unknown field without saying where it is, reports type errors without list indexes,
// and passes a field's own UnmarshalJSON error on with no field at all. So the file is walked
// once more, against the Go types, to find the first value the decoder would refuse. If the
// walk finds nothing, the decoder's error is returned as it is.
func locate(data []byte, decodeErr error) error {
	j, err := yaml.YAMLToJSONStrict(data)
	if err != nil {
		return err // a YAML syntax error; it carries its line number
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return decodeErr
	}
	if err := check(reflect.TypeFor[Targets](), v, ""); err != nil {
		return err
	}
	return decodeErr
}

var (
	rawMessageType  = reflect.TypeFor[json.RawMessage]()
	unmarshalerType = reflect.TypeFor[json.Unmarshaler]()
)

// check reports the first place where v, a generic JSON value, does not fit type t, as
// encoding/json with unknown fields disallowed would decide.
func check(t reflect.Type, v any, path string) error {
	if v == nil {
		return nil // null leaves any field at its zero value
	}
	if t == rawMessageType {
		return nil
	}
	if reflect.PointerTo(t).Implements(unmarshalerType) {
		b, err := json.Marshal(v)
		if err != nil {
			return nil
		}
		if err := reflect.New(t).Interface().(json.Unmarshaler).UnmarshalJSON(b); err != nil {
			return at(path, "%v", err)
		}
		return nil
	}
	switch t.Kind() {
	case reflect.Pointer:
		return check(t.Elem(), v, path)
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			return at(path, "must be a mapping (got %s)", kindOf(v))
		}
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			f, ok := field(t, k)
			if !ok {
				return at(join(path, k), "unknown field (known: %s)", strings.Join(fieldNames(t), ", "))
			}
			if err := check(f.Type, m[k], join(path, k)); err != nil {
				return err
			}
		}
	case reflect.Slice:
		l, ok := v.([]any)
		if !ok {
			return at(path, "must be a list (got %s)", kindOf(v))
		}
		for i, e := range l {
			if err := check(t.Elem(), e, fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	case reflect.String:
		// sigs.k8s.io/yaml turns a number or boolean into a string where a string is wanted.
		switch v.(type) {
		case string, json.Number, bool:
		default:
			return at(path, "must be a string (got %s)", kindOf(v))
		}
	case reflect.Bool:
		if _, ok := v.(bool); !ok {
			return at(path, "must be true or false (got %s)", kindOf(v))
		}
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		n, ok := v.(json.Number)
		if !ok {
			return at(path, "must be an integer (got %s)", kindOf(v))
		}
		if _, err := strconv.ParseInt(n.String(), 10, t.Bits()); err != nil {
			return at(path, "must be an integer in range (got %s)", n)
		}
	}
	return nil
}

// field finds the struct field that JSON key k decodes into; encoding/json matches names
// case-insensitively.
func field(t reflect.Type, k string) (reflect.StructField, bool) {
	for f := range t.Fields() {
		if name, ok := jsonName(f); ok && strings.EqualFold(name, k) {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

func fieldNames(t reflect.Type) []string {
	var names []string
	for f := range t.Fields() {
		if name, ok := jsonName(f); ok {
			names = append(names, name)
		}
	}
	return names
}

func jsonName(f reflect.StructField) (string, bool) {
	if !f.IsExported() {
		return "", false
	}
	name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
	switch name {
	case "-":
		return "", false
	case "":
		return f.Name, true
	}
	return name, true
}

func kindOf(v any) string {
	switch v := v.(type) {
	case map[string]any:
		return "a mapping"
	case []any:
		return "a list"
	case string:
		return strconv.Quote(v)
	case json.Number:
		return v.String()
	case bool:
		return strconv.FormatBool(v)
	}
	return fmt.Sprintf("%T", v)
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func at(path, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if path == "" {
		return errors.New(msg)
	}
	return fmt.Errorf("%s: %s", path, msg)
}
